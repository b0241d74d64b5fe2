"""Errors a user of posttrain.sandboxes can cause; each message names the cause and the fix."""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of every error raised by posttrain.sandboxes."""


class SandboxConfigError(SandboxError, ValueError):
    """A SandboxConfig / Limits value is invalid (message names the field)."""


class SandboxUnavailableError(SandboxError):
    """A required isolation layer cannot be set up on this host (message names the layer and the fix)."""


class SandboxEscapeError(SandboxError):
    """The start-up escape canary saw something get through that a layer should have blocked."""


class SandboxClosedError(SandboxError):
    """run()/arun() was called after close()."""
