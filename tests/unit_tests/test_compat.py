"""The fused-kernel compatibility checker flags extreme norm weights layer by layer."""

from braid_engine.cli import main
from braid_engine.compat import check_checkpoint
from braid_engine.testing import make_tiny_checkpoint


def test_plain_checkpoint_is_safe(tmp_path):
    report = check_checkpoint(make_tiny_checkpoint(tmp_path / "plain"))
    assert report.risky_layers == set()
    assert report.warnings() == []
    assert sorted(report.layers) == [-1, 0, 1]
    assert 0 < report.score < 1.5 * 2 ** -8 + 1e-9


def test_qwen3_k_norm_weights_fall_back(tmp_path):
    report = check_checkpoint(make_tiny_checkpoint(tmp_path / "q", k_norm_max=96.5))
    assert report.risky_layers == {0, 1}
    assert report.level(-1) == "ok"
    assert abs(report.score - 96.5 * 2 ** -8) < 1e-3
    assert any("k_norm weight reaches 96.5" in w for w in report.warnings())


def test_cli_check_prints_the_report(tmp_path, capsys):
    path = make_tiny_checkpoint(tmp_path / "c", k_norm_max=40.0)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "unfused layers: [0, 1]" in out
    assert "k_norm" in out
