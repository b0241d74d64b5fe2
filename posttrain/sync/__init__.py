"""Weight sync beyond the bucket format of :mod:`posttrain.weight_sync`.

- :mod:`posttrain.sync.group`: the model-update process group (one sending trainer rank plus
  every rank of every rollout worker), rendezvous through a TCP store the driver hosts.
- :mod:`posttrain.sync.collective`: broadcasting one version bucket by bucket over that group
  (sender: gather, pack, send with at most two buckets alive; receiver: yields ``WeightBucket``).
- :mod:`posttrain.sync.ipc`: ``sync.transport: ipc``, the same messages between a trainer rank
  and the engine on its own device, payloads handed over as memory handles (CUDA IPC; shared-
  memory files on CPU): NCCL refuses two ranks on one GPU.
- :mod:`posttrain.sync.device`: the device, streams and events a transfer runs on (no-ops on CPU):
  the current device set in every thread, payloads read only after their event.
- :mod:`posttrain.sync.config`: the recipe's ``sync`` section and what each transport needs of
  the placement.
- :mod:`posttrain.sync.names`: trainer parameter names/layouts -> the engine's checkpoint layout
  (fused MoE experts -> per-expert tensors).
"""
