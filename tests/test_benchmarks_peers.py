import importlib.util
import json
import math

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # shap, at import
TINY = ["--settings", "4", "--patch-size", "8", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2"]


@pytest.fixture(scope="module")
def peers():
    """The package benchmarks/experiments/peers/."""
    from benchmarks.experiments import peers

    return peers


def run_and_check(peers, argv, tmp_path) -> dict:
    """Run the benchmark on a 4-patch problem at budgets 10 and 16: results written, every installed
    library run at each budget; shapiq at the full budget (2^4 coalitions) recovers the exact
    references of both games, which checks that the pixel game the peers compute is shapkern's
    mode='input' game. Returns the setting's result."""
    argv = argv + ["--budgets", "10", "16", "--seeds", "1", "--device", "cpu", "--out", str(tmp_path)]
    payload = peers.main(argv + ["--cache", str(tmp_path / "cache")])
    assert (tmp_path / "peers.md").read_text().startswith("# Peer libraries against shapkern.explain")
    assert "target ≥ 2×" in (tmp_path / "peers.md").read_text()
    (result,) = json.loads((tmp_path / "peers.json").read_text())["settings"]
    assert result == json.loads(json.dumps(payload["settings"][0]))
    assert result["players"] == 4 and result["failed"] == {}
    for name, method in peers.methods().items():
        installed = importlib.util.find_spec(method.library) is not None
        assert (name in result["skipped"]) != installed, name
        if installed:
            runs = result["runs"][name]
            assert [r["budget"] for r in runs] == [10, 16], name
            assert all(math.isfinite(r["error"]) and r["seconds"] > 0 for r in runs), name
            assert 0 < runs[-1]["evaluations"] <= 20, name
    for name in ("shapiq KernelSHAP, pixel game", "shapiq KernelSHAP on ShapkernGame"):
        if name not in result["skipped"]:
            assert result["runs"][name][-1]["error"] < 1e-4, name
    assert set(payload["settings"][0]["equal_error"]) == {10, 16}
    # Both references are cached, keyed by what defines them, and exact.
    cached = [json.loads(path.read_text()) for path in sorted((tmp_path / "cache").glob("reference-*.json"))]
    assert sorted(ref["key"]["game"] for ref in cached) == ["pixels", "tokens"]
    assert all(ref["method"] == "exact" and ref["evaluations"] == 16 for ref in cached)
    return result


def test_peers_smoke(peers, tmp_path):
    run_and_check(peers, TINY, tmp_path)


def test_peers_on_a_trained_checkpoint(peers, tmp_path):
    """--checkpoint: a `shapkern train` ShapleyViT (N = 4), whose f(x) = Σ Φ the peers call, on a
    test image of its dataset; a --settings that contradicts the checkpoint is an error."""
    from shapkern.training import train

    train(
        data="digits", patch_size=16, depth=1, embed_dim=16, num_heads=2, epochs=1, batch_size=32,
        limit_train=64, limit_test=16, num_coalitions=4, faith_images=0, heatmap_images=0, progress=False,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    checkpoint = ["--checkpoint", str(tmp_path / "run" / "checkpoint.pt")]
    result = run_and_check(peers, checkpoint + ["--image-seed", "3"], tmp_path / "bench")
    assert result["img_size"] == 32 and result["patch"] == 16
    assert "the ShapleyViT of" in (tmp_path / "bench" / "peers.md").read_text()
    with pytest.raises(SystemExit, match="has 4 patches"):
        peers.main(checkpoint + ["--settings", "16", "--out", str(tmp_path / "bad")])


def test_seconds_at_error_interpolates_log_log(peers):
    runs = [
        {"error": e, "seconds": s, "evaluations": 64 * s} for e, s in ((0.4, 1.0), (0.1, 4.0), (0.05, 16.0))
    ]
    assert peers.seconds_at_error(runs, 0.5) == ("≤", 1.0)
    assert peers.seconds_at_error(runs, 0.2) == ("=", pytest.approx(2.0))  # halfway in log error
    assert peers.seconds_at_error(runs, 0.1) == ("=", pytest.approx(4.0))
    assert peers.seconds_at_error(runs, 0.01) == (">", 16.0)
    exhausted = runs[:2] + [{"error": 0.09, "seconds": 5.0, "evaluations": 256}]  # no more evaluations
    assert peers.seconds_at_error(exhausted, 0.01) == ("never", math.inf)
