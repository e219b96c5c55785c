"""The app's --conf values reach the engine (a value read and then dropped is worse than none)."""

from __future__ import annotations

import pytest

from lib.serving.host import ModelHost
from lib.settings import AppSettings, ConfError

CONF = {"weights": "seeded", "model_config": "segvol-tiny", "device": "cpu"}


def test_engine_settings_reach_the_predictor(tmp_path):
    conf = dict(
        CONF, cache_mb="64", window_batch="2", decode_batch="3", precision="bf16", zoom_in="false", overlap="0.25"
    )
    service = ModelHost(AppSettings.from_conf(conf, tmp_path / "model"))
    service.load()
    p = service.wait(timeout=60)
    got = (p.cache_mb, p.window_batch, p.decode_batch, p.precision, p.zoom_in, p.overlap)
    assert got == (64.0, 2, 3, "bf16", False, 0.25)
    assert str(p.device) == "cpu"


@pytest.mark.parametrize(
    "key,value", [("cache_mb", "lots"), ("window_batch", "2.5"), ("precision", "fp8"), ("overlap", "1.0")]
)
def test_a_bad_engine_setting_names_itself(tmp_path, key, value):
    with pytest.raises(ConfError, match=f"--conf {key} '{value}'"):
        AppSettings.from_conf(dict(CONF, **{key: value}), tmp_path / "model")
