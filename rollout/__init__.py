"""posttrain.rollout (installed from the top-level rollout/ folder): generation and the receiving
end of weight sync.

- ``sampling.SamplingConfig``: the recipe's ``rollout.sampling`` section.
- ``engine.RolloutEngine``: the engine Protocol; ``vllm_engine.VLLMEngine`` (default) and
  ``hf_engine.HFEngine`` (transformers fallback) implement it.
- ``weight_receiver``: the per-version checks every engine runs on incoming weight buckets.
- ``vllm_transfer``: the CPU weight-transfer backend registered with vLLM.
- ``actor``: ``RolloutWorker`` and ``start_rollout_actor`` (Ray).

Importing this package imports neither vLLM nor Ray; the submodules that need them do.
"""
