"""The continuous-batching Engine: every request gets exactly the tokens of the uncached reference decoding
it alone, whatever else runs and whenever it joined (staggered submissions with random parameters, greedy and
sampled); admission waits for pages and frees them at once; cancel; requests that can never fit; the
background loop; done callbacks; non-finite logits fail only their own request; the compiled step gives the same
tokens."""
import random
import threading

import pytest
import torch

import llada_engine
from llada_engine.decoding import Engine, RequestError
from model_testing import tiny_checkpoint

pytestmark = pytest.mark.kernels

Lb = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, cfg, _ = tiny_checkpoint(tmp_path_factory.mktemp("engine"), seed=31)
    return llada_engine.load_model(path), cfg


def random_request(rng: random.Random, cfg: dict) -> tuple[list[int], dict]:
    prompt = [rng.randrange(cfg["vocab_size"] - 2) for _ in range(rng.randint(1, 30))]
    kw = dict(gen_length=rng.randint(1, 30), steps=rng.choice([1, 2, 3, 4, 8, 16]),
              threshold=rng.choice([0.3, 0.6, 0.9, 0.99]), eos_early_stop=rng.random() < 0.3,
              eos_id=rng.choice([None, cfg["eos_token_id"], rng.randrange(cfg["vocab_size"] - 2)]))
    if rng.random() < 0.5:
        kw |= dict(temperature=rng.choice([0.7, 1.0, 1.3]), top_k=rng.choice([0, 5, 40]),
                   top_p=rng.choice([1.0, 0.9, 0.5]), seed=rng.randrange(1 << 32))
    return prompt, kw


def alone(model, prompt, kw) -> list[int]:
    return llada_engine.generate(model, prompt, block_length=Lb, use_cache=False, **kw).sequences[0]


def test_staggered_requests_equal_each_alone(tiny):
    model, cfg = tiny
    rng = random.Random(0)
    engine = Engine(model, max_running=6, cache_tokens=40 * Lb, block_length=Lb)
    pending = [random_request(rng, cfg) for _ in range(100)]
    submitted = []
    while pending or engine.running or engine.waiting:
        for _ in range(rng.choice([0, 0, 1, 1, 2, 5])):
            if pending:
                prompt, kw = pending.pop()
                submitted.append((prompt, kw, engine.submit(prompt, **kw)))
        engine.step()
    assert len(submitted) == 100
    for prompt, kw, request in submitted:
        assert request.done and request.finish_reason in ("stop", "length")
        assert request.result() == alone(model, prompt, kw), (prompt, kw)
    assert engine.cache.free_pages == engine.cache.num_pages


def test_admission_waits_for_pages_and_cancel_frees_them(tiny):
    model, cfg = tiny
    engine = Engine(model, max_running=4, cache_tokens=6 * Lb, block_length=Lb)
    prompt = list(range(1, 17))                                   # two whole blocks: prefilled into 2 pages
    first = engine.submit(prompt, gen_length=2 * Lb, steps=Lb, threshold=1.0)   # 3 pages
    second = engine.submit(prompt, gen_length=2 * Lb, steps=Lb, threshold=1.0)  # 3 pages
    third = engine.submit(prompt, gen_length=Lb, steps=Lb, threshold=1.0)       # 2 pages: waits behind
    engine.step()
    assert engine.running == 2 and engine.waiting == 1 and engine.cache.free_pages == 0
    first.cancel()
    engine.step()
    assert first.done and first.finish_reason == "cancelled"
    assert engine.running == 2 and engine.waiting == 0 and engine.cache.free_pages == 1
    engine.run_until_idle()
    assert second.result() == alone(model, prompt, dict(gen_length=2 * Lb, steps=Lb, threshold=1.0))
    assert third.result() == alone(model, prompt, dict(gen_length=Lb, steps=Lb, threshold=1.0))
    assert engine.cache.free_pages == 6
    waiting = Engine(model, max_running=1, cache_tokens=6 * Lb, block_length=Lb)
    running = waiting.submit(prompt, gen_length=Lb)
    queued = waiting.submit(prompt, gen_length=Lb)
    queued.cancel()
    waiting.run_until_idle()
    assert running.finish_reason in ("stop", "length") and queued.finish_reason == "cancelled"
    assert queued.tokens == []


def test_requests_that_can_never_fit_are_refused_at_submit(tiny):
    model, _ = tiny
    engine = Engine(model, max_running=2, cache_tokens=4 * Lb, block_length=Lb)
    with pytest.raises(ValueError, match="can never fit"):
        engine.submit(list(range(1, 30)), gen_length=30)
    with pytest.raises(ValueError, match="block_length must equal the engine's block_length 8"):
        engine.submit([1, 2], gen_length=4, block_length=16)
    with pytest.raises(ValueError, match="cache_tokens"):
        Engine(model, cache_tokens=-1)
    with pytest.raises(ValueError, match="max_running"):
        Engine(model, max_running=0)


def test_background_loop_serves_threads_and_stops(tiny):
    model, cfg = tiny
    engine = Engine(model, max_running=4, cache_tokens=64 * Lb, block_length=Lb)
    engine.start()
    rng = random.Random(5)
    work = [random_request(rng, cfg) for _ in range(8)]
    results = {}

    def client(i):
        prompt, kw = work[i]
        request = engine.submit(prompt, **kw)
        results[i] = [t for chunk in request.stream() for t in chunk]
        assert results[i] == request.result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    long = engine.submit(list(range(1, 9)), gen_length=200, steps=200, threshold=1.0)
    engine.stop()
    assert long.done and long.finish_reason in ("cancelled", "stop", "length")
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit([1], gen_length=1)
    for i, (prompt, kw) in enumerate(work):
        assert results[i] == alone(model, prompt, kw)


def test_done_callbacks_run_once_when_a_request_ends(tiny):
    model, _ = tiny
    engine = Engine(model, max_running=2, cache_tokens=16 * Lb, block_length=Lb)
    ended = []
    finished = engine.submit([1, 2, 3], gen_length=Lb)
    finished.add_done_callback(lambda r: ended.append((r.id, r.finish_reason, list(r.tokens))))
    cancelled = engine.submit([1, 2, 3], gen_length=Lb)
    cancelled.add_done_callback(lambda r: ended.append((r.id, r.finish_reason, list(r.tokens))))
    cancelled.cancel()
    assert ended == []
    engine.run_until_idle()
    assert sorted(ended) == [(finished.id, finished.finish_reason, finished.result()), (cancelled.id, "cancelled", [])]
    finished.add_done_callback(lambda r: ended.append(r.id))          # already ended: called at once
    assert ended[-1] == finished.id and len(ended) == 3


def test_non_finite_logits_fail_only_their_request(tmp_path):
    path, cfg, _ = tiny_checkpoint(tmp_path, seed=32, first_k_dense_replace=3)
    model = llada_engine.load_model(path)
    poisoned = 7
    with torch.no_grad():
        model.model.word_embeddings.weight[poisoned] = float("nan")
    engine = Engine(model, max_running=4, cache_tokens=16 * Lb, block_length=Lb)
    bad = engine.submit([1, poisoned, 3], gen_length=Lb)
    good = engine.submit([1, 2, 3], gen_length=Lb)
    engine.run_until_idle()
    assert bad.finish_reason == "error"
    with pytest.raises(RequestError, match="not finite"):
        bad.result()
    assert good.result() == alone(model, [1, 2, 3], dict(gen_length=Lb))
    assert engine.cache.free_pages == 16


def test_compiled_step_gives_the_same_tokens(tiny):
    model, cfg = tiny
    torch._dynamo.reset()
    rng = random.Random(9)
    work = [random_request(rng, cfg) for _ in range(5)]
    engine = Engine(model, max_running=4, cache_tokens=64 * Lb, block_length=Lb, compile=True)
    requests = [engine.submit(prompt, **kw) for prompt, kw in work]
    engine.run_until_idle()
    for (prompt, kw), request in zip(work, requests):
        assert request.result() == alone(model, prompt, kw)


@pytest.mark.gpu
def test_cuda_step_waits_for_the_device_only_at_its_readback(tmp_path):
    path, cfg, _ = tiny_checkpoint(tmp_path, seed=33, head_dim=64)
    model = llada_engine.load_model(path, dtype=torch.bfloat16, device="cuda")
    engine = Engine(model, max_running=4, cache_tokens=64 * Lb, block_length=Lb)
    requests = [engine.submit(list(range(1, n)), gen_length=4 * Lb, steps=Lb, threshold=1.0) for n in (3, 12, 20)]
    engine.step()                                     # admission and prefill (validates cu_seqlens on the host)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    engine.run_until_idle()
    for n, request in zip((3, 12, 20), requests):
        assert request.result() == llada_engine.generate(model, list(range(1, n)), gen_length=4 * Lb, steps=Lb,
                                                         threshold=1.0, block_length=Lb).sequences[0]
