"""Weight sync beyond the bucket format of :mod:`posttrain.weight_sync`.

- :mod:`posttrain.sync.group`: the model-update process group (one sending trainer rank plus
  every rank of every rollout worker), rendezvous through a TCP store the driver hosts.
- :mod:`posttrain.sync.collective`: broadcasting one version bucket by bucket over that group
  (sender: gather, pack, send with at most two buckets alive; receiver: yields ``WeightBucket``).
- :mod:`posttrain.sync.names`: trainer parameter names/layouts -> the engine's checkpoint layout
  (fused MoE experts -> per-expert tensors).
"""
