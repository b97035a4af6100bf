"""Several devices per server, on the CPU: context parallelism with the gloo backend in two
processes against one process, on the tiny model (its 2 attention heads split over 2 ranks)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch.multiprocessing as mp

from conftest import free_port, image_difference


def _context_parallel_rank(rank: int, world: int, port: int, tiny_dir: str, speeds: list, graphs: list, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from ryla.flux.engine import FluxEngine
        from ryla.models.store import ModelStore
        from ryla.runtime import Runtime
        from ryla.speed.context_parallel import ContextParallel

        store = ModelStore(tiny_dir, tiny=True)
        for speed in speeds:
            engine = FluxEngine(store, speed=speed, context_parallel=ContextParallel.from_default_group())
            runtime = Runtime(store, engine)
            images = [np.asarray(runtime.run(graph).images[0]) for graph in graphs]
            results.put((speed, rank, images, transformer_output(runtime.engine)))
    finally:
        dist.destroy_process_group()


def run_context_parallel(tiny_dir, speeds: list[str], graphs: list, world: int = 2) -> dict:
    """Each graph run by `world` gloo ranks together, in each speed mode: {(speed, rank):
    (images, transformer velocity)}."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_context_parallel_rank,
                                 args=(rank, world, port, str(tiny_dir), speeds, graphs, results))
                 for rank in range(world)]
    for process in processes:
        process.start()
    try:
        out = {(speed, rank): (images, velocity) for speed, rank, images, velocity in
               (results.get(timeout=600) for _ in range(world * len(speeds)))}
    finally:
        for process in processes:
            process.join(timeout=60)
    assert all(process.exitcode == 0 for process in processes)
    return out


def transformer_output(engine) -> np.ndarray:
    """One transformer call on fixed random inputs with an uneven token count (15 image tokens,
    7 text tokens): the velocity, as a float64 array."""
    import torch

    model, _, _ = engine.load_checkpoint("flux1-dev-fp8.safetensors")
    transformer = model.transformer
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    inputs = dict(
        hidden_states=torch.randn(1, 15, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(5.0), indexing="ij"),
                            -1).reshape(15, 3),
        txt_ids=torch.zeros(7, 3), return_dict=False)
    with torch.inference_mode():
        return transformer(**{k: v.to(engine.dtype) if torch.is_tensor(v) else v
                              for k, v in inputs.items()})[0].double().numpy()


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_context_parallel_on_two_processes_matches_one(tiny_dir, tiny_store):
    from ryla.flux.engine import FluxEngine
    from ryla.runtime import Runtime
    from ryla.workflows import FLUX_DEV

    graphs = [
        FLUX_DEV.fill(prompt="a red fox", width=64, height=64, steps=3, seed=5),
        # 80x48: 15 image tokens, shared 8 + 7 between the ranks
        FLUX_DEV.fill(prompt="a lighthouse at dusk", width=80, height=48, steps=3, seed=6, cfg=2.0,
                      negative_prompt="blurry"),
    ]
    speeds = ["exact", "fast"]
    ranks = run_context_parallel(tiny_dir, speeds, graphs)
    for speed in speeds:
        single = Runtime(tiny_store, FluxEngine(tiny_store, speed=speed))
        expected = [np.asarray(single.run(graph).images[0]) for graph in graphs]
        expected_velocity = transformer_output(single.engine)
        (images, velocity), (other_images, other_velocity) = ranks[(speed, 0)], ranks[(speed, 1)]
        # The transformer: every rank gets the whole output, equal to one process's up to the
        # order of the attention's sums (float32 here; fp8 attention rounds more).
        assert np.array_equal(velocity, other_velocity)
        error = relative_l2(velocity, expected_velocity)
        print(f"{speed} transformer: rel. L2 {error:.2e} against one process")
        assert error <= (1e-5 if speed == "exact" else 1e-3), error
        for index, reference in enumerate(expected):
            assert np.array_equal(images[index], other_images[index]), "every rank holds the same image"
            assert images[index].shape == reference.shape
            error = relative_l2(images[index], reference)
            print(f"{speed} graph {index}: rel. L2 {error:.5f} against one process")
            # (the tiny model's noise images move little even when attention sees half the
            # tokens: rel. L2 0.002-0.004 then; the transformer check above is the sharp one)
            assert error <= (0.001 if speed == "exact" else 0.002), error


def _png_array(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image).astype(np.float64)


BODY = {"prompt": "a red fox", "width": 112, "height": 80, "steps": 3, "seed": 3, "output_format": "png"}


def test_serve_context_parallel_over_http_matches_one_process_and_cancels_on_every_rank(server_env, tiny_store,
                                                                                         tmp_path):
    """`ryla serve --devices cpu,cpu --parallel context`: two gloo ranks behind one HTTP server
    (35 image tokens: shares of 18 and 17). The image equals one exact-mode process's; a job
    cancelled halfway stops on both ranks, and the next request still matches."""
    import httpx

    from conftest import Server

    from ryla.flux.engine import FluxEngine
    from ryla.runtime import Runtime
    from ryla.workflows import FLUX_DEV

    single = Runtime(tiny_store, FluxEngine(tiny_store, speed="exact"))
    params = {k: v for k, v in BODY.items() if k != "output_format"}
    expected = np.asarray(single.run(FLUX_DEV.fill(**params)).images[0]).astype(np.float64)
    group = Server(server_env, "--devices", "cpu,cpu", "--parallel", "context", log_path=tmp_path / "context.log")
    try:
        health = httpx.get(group.url + "/health").json()
        assert health["parallel"]["mode"] == "context" and health["speed"]["context_parallel"] == 2
        response = httpx.post(group.url + "/flux-dev", json=BODY, timeout=120)
        assert response.status_code == 200
        assert relative_l2(_png_array(response.content), expected) <= 1e-3
        job = httpx.post(group.url + "/flux-dev", json={**BODY, "width": 256, "height": 256, "steps": 100},
                         headers={"Prefer": "respond-async"}).json()
        import time

        deadline = time.time() + 60
        while httpx.get(group.url + f"/jobs/{job['job_id']}").json()["progress"] is None and time.time() < deadline:
            time.sleep(0.2)
        cancelled = httpx.delete(group.url + f"/jobs/{job['job_id']}", timeout=60).json()
        assert cancelled["status"] == "interrupted" and cancelled["progress"]["value"] < 100
        again = httpx.post(group.url + "/flux-dev", json=BODY, timeout=120)
        assert again.status_code == 200
        assert image_difference(again.content, response.content) <= 2  # conftest.image_difference says why
    finally:
        group.stop()


def test_serve_replicas_runs_requests_side_by_side(server_env, tmp_path):
    """`--parallel replicas` with two CPU "devices": two engines, two workers; two long jobs
    run at once, and each image equals the single server's."""
    import time

    import httpx

    from conftest import Server

    group = Server(server_env, "--devices", "cpu,cpu", "--parallel", "replicas", log_path=tmp_path / "replicas.log")
    try:
        health = httpx.get(group.url + "/health").json()
        assert health["parallel"] == {"mode": "replicas", "devices": ["cpu", "cpu"]}
        long = {**BODY, "width": 256, "height": 256, "steps": 60}
        jobs = [httpx.post(group.url + "/flux-dev", json={**long, "seed": seed}, headers={"Prefer": "respond-async"})
                .json()["job_id"] for seed in (1, 2)]
        deadline, running = time.time() + 60, 0
        while time.time() < deadline and running < 2:
            running = len(httpx.get(group.url + "/queue").json()["queue_running"])
            time.sleep(0.1)
        assert running == 2, "both replicas work at once"
        for job_id in jobs:
            httpx.delete(group.url + f"/jobs/{job_id}", timeout=60)
        first = httpx.post(group.url + "/flux-dev", json=BODY, timeout=120)
        second = httpx.post(group.url + "/flux-dev", json=BODY, timeout=120)
        assert first.status_code == second.status_code == 200
        assert relative_l2(_png_array(first.content), _png_array(second.content)) <= 1e-3
    finally:
        group.stop()
