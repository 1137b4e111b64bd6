"""The latency table: every competitor in one run, the engine restored, a footnote for slow mixq rows."""

import torch
from torch import nn

from mixq import latency


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()


def test_baselines_are_every_competitor_and_restore_the_engine():
    before = torch.backends.quantized.engine
    models = latency.baselines(_tiny(), ["0", "2"], "cpu")
    assert torch.backends.quantized.engine == before
    engines = [e for e in latency.INT8_ENGINES if e in torch.backends.quantized.supported_engines]
    assert list(models) == [latency.FLOAT32, latency.BFLOAT16] + [latency.int8_name(e) for e in engines]
    x = torch.randn(3, 16)
    ref = models[latency.FLOAT32](x)
    for name, m in models.items():
        out = m(x)
        assert out.shape == ref.shape, name
        assert torch.allclose(out.float(), ref, atol=0.1), name  # each is the same model, approximately
    assert models[latency.BFLOAT16](x).dtype == torch.bfloat16


def test_int8_engine_is_restored_on_error():
    before = torch.backends.quantized.engine
    try:
        latency.torch_int8_dynamic(_tiny(), ["0"], "no-such-engine")
    except ValueError as e:
        assert "supported" in str(e)
    else:
        raise AssertionError("an unknown engine must raise")
    assert torch.backends.quantized.engine == before


def test_compare_ratios_and_footnote_for_a_slow_mixq_row():
    fp = _tiny()
    slow = nn.Sequential(*[_tiny() if i == 0 else nn.Identity() for i in range(1)])

    class Slower(nn.Module):  # a stand-in "mixq" model that is certainly slower than float32
        def forward(self, x):
            for _ in range(50):
                y = fp(x)
            return y

    models = {**latency.baselines(fp, ["0", "2"]), "mixq W8A8": Slower()}
    rows = latency.compare(models, torch.randn(4, 16), iters=3)
    assert [r["name"] for r in rows] == list(models)
    by = {r["name"]: r for r in rows}
    assert by[latency.FLOAT32]["speedup"] == 1.0
    best = min(by[n]["median_ms"] for n in latency.BASELINE_NAMES if n in by)
    assert abs(by["mixq W8A8"]["vs_best_baseline"] - best / by["mixq W8A8"]["median_ms"]) < 1e-12
    assert by["mixq W8A8"]["speedup"] < 1.0
    md = latency.markdown_table(rows, ["mixq W8A8"], backends=["cpu"])
    assert "| mixq W8A8 [1] |" in md
    assert "[1] mixq W8A8 is" in md and "kernels" in md
    assert f"CPU kernel family: `{latency.kernel_path()}`" in md
    assert slow is not None


def test_no_footnote_when_mixq_is_faster():
    rows = [{"name": "float32", "median_ms": 10.0, "min_ms": 9.0, "iters": 3, "speedup": 1.0,
             "vs_best_baseline": 0.5},
            {"name": "mixq", "median_ms": 4.0, "min_ms": 3.9, "iters": 3, "speedup": 2.5, "vs_best_baseline": 1.25}]
    md = latency.markdown_table(rows, ["mixq"])
    assert "[1]" not in md and "| mixq | 4.0 |" in md


def test_mixq_bench_prints_every_baseline_and_the_kernel_family(tmp_path, capsys):
    from mixq.cli import main

    out = tmp_path / "u"
    assert main(["quantize", "toy-vit", "--uniform", "W8A8", "--n-calib", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["bench", str(out / "model.safetensors"), "--iters", "2"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"CPU kernel family: {latency.kernel_path()}" in text
    for word in ("float32", "bfloat16", "fbgemm", "onednn", "vs best baseline"):
        assert word in text, word
