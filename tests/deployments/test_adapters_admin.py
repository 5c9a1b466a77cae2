"""Issue 8 item 2: adapter registration through the admin API refuses what it must (nothing
half-registered), needs the admin token, and registering/deleting while requests run breaks
none of them."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from servekit import ADMIN_TOKEN, Served, base_model_dir, meta_base_shapes, write_adapter

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def register(served: Served, payload: dict[str, Any], headers: dict | None = AUTH):
    return httpx.post(f"{served.url}/v1/adapters", json=payload, headers=headers, timeout=120)


def delete(served: Served, name: str, headers: dict | None = AUTH):
    return httpx.delete(f"{served.url}/v1/adapters/{name}", headers=headers, timeout=60)


def listed(served: Served) -> set[str]:
    r = httpx.get(f"{served.url}/v1/adapters", timeout=60)
    assert r.status_code == 200
    return {a["name"] for a in r.json()["data"]}


@pytest.fixture(scope="module")
def uploads(served: Served) -> Path:
    """Adapter dirs the tests register: good ones and every kind of bad one."""
    import torch
    from safetensors.torch import save_file

    from dlp.lora.adapter import random_adapter, save_adapter

    root = served.assets.root
    up = root / "uploads"
    up.mkdir(exist_ok=True)
    write_adapter(up, "good", seed=11)
    write_adapter(up, "good2", seed=12)
    write_adapter(up, "high_rank", seed=13, rank=32)

    shapes = meta_base_shapes(base_model_dir())
    nan = random_adapter("nan", shapes, seed=14)
    module = next(iter(nan.weights))
    nan.weights[module][0][0, 0] = math.nan
    save_adapter(nan, up / "nan")

    # An adapter made for another base model (hidden 64): shapes do not fit this one.
    other = {m: (64, 64) for m in shapes if m.endswith(("q_proj", "v_proj"))}
    save_adapter(random_adapter("other", other, seed=15), up / "other_base")

    # Pickled weights next to a valid config: refused without opening the pickle.
    pickled = up / "pickled"
    write_adapter(up, "pickled", seed=16)
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")

    # Right file names, garbage inside.
    broken = up / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    )
    save_file({"junk": torch.zeros(2)}, str(broken / "adapter_model.safetensors"))

    # A symlink inside the root that points outside it.
    outside = served.assets.cache_dir / "outside_adapter"
    write_adapter(outside.parent, "outside_adapter", seed=17)
    link = up / "escape"
    if not link.exists():
        os.symlink(outside, link)
    return up


def test_admin_token_required(served: Served, uploads: Path) -> None:
    payload = {"name": "tok", "path": "uploads/good"}
    r = register(served, payload, headers=None)
    assert r.status_code == 401 and r.json()["error"]["param"] == "authorization"
    r = register(served, payload, headers={"authorization": "Bearer wrong-token"})
    assert r.status_code == 403
    r = register(served, payload, headers={"authorization": "Basic abc"})
    assert r.status_code == 401
    assert delete(served, "alpha", headers=None).status_code == 401
    assert delete(served, "alpha", headers={"authorization": "Bearer nope"}).status_code == 403
    assert "tok" not in listed(served) and "alpha" in listed(served)


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("../outside_adapter", 400, ".."),
        ("/etc", 400, "relative"),
        ("uploads/escape", 400, "adapter root"),
        ("uploads/pickled", 400, "pickle"),
        ("uploads/nan", 400, "non-finite"),
        ("uploads/other_base", 400, "shape"),
        ("uploads/high_rank", 400, "rank"),
        ("uploads/broken", 400, "unsupported tensor"),
        ("uploads/missing", 404, "no adapter directory"),
    ],
)
def test_registration_refusals(
    served: Served, uploads: Path, path: str, status: int, words: str
) -> None:
    before = listed(served)
    r = register(served, {"name": "candidate", "path": path})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == "path"
    assert words in err["message"], err["message"]
    # Nothing half-registered: not listed, not usable.
    assert listed(served) == before
    r = httpx.post(
        f"{served.url}/v1/completions",
        json={"model": "candidate", "prompt": "hi", "max_tokens": 1},
        timeout=60,
    )
    assert r.status_code == 404


def test_register_use_duplicate_replace_delete(served: Served, uploads: Path) -> None:
    r = register(served, {"name": "fresh", "path": "uploads/good"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "fresh" and r.json()["routable"] is False
    assert "fresh" in listed(served)
    models = httpx.get(f"{served.url}/v1/models", timeout=60).json()
    assert "fresh" in {m["id"] for m in models["data"]}
    gen = httpx.post(
        f"{served.url}/v1/completions",
        json={"model": "fresh", "prompt": "Hi", "max_tokens": 2},
        timeout=120,
    )
    assert gen.status_code == 200 and gen.json()["dlp"]["mix"] == {"fresh": 1.0}

    dup = register(served, {"name": "fresh", "path": "uploads/good2"})
    assert dup.status_code == 409 and dup.json()["error"]["param"] == "name"
    rep = register(served, {"name": "fresh", "path": "uploads/good2", "replace": True})
    assert rep.status_code == 201, rep.text

    bad_name = register(served, {"name": "../x", "path": "uploads/good"})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"

    assert delete(served, "fresh").status_code == 200
    assert "fresh" not in listed(served)
    assert delete(served, "fresh").status_code == 404
    gone = httpx.post(
        f"{served.url}/v1/completions",
        json={"model": "fresh", "prompt": "Hi", "max_tokens": 2},
        timeout=60,
    )
    assert gone.status_code == 404


def test_register_and_delete_while_requests_run(served: Served, uploads: Path) -> None:
    """Requests on other adapters keep succeeding while the catalogue changes."""
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                r = client.post(
                    f"{served.url}/v1/completions",
                    json={
                        "model": "dlp",
                        "adapters": {"alpha": 1, "beta": 1},
                        "prompt": "Tell me",
                        "max_tokens": 4,
                    },
                )
                results.append(r.status_code)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(3):
            name = f"churn{i}"
            assert register(served, {"name": name, "path": "uploads/good2"}).status_code == 201
            r = httpx.post(
                f"{served.url}/v1/completions",
                json={"model": name, "prompt": "Hi", "max_tokens": 2},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            assert delete(served, name).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert results, "the load threads sent nothing"
    assert set(results) == {200}, results
