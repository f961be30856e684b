"""mqtt_resync_interval_s: read from the file and the environment, refused unless positive."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.hub.config import HubConfig, load_hub_config
from modelfleet.kernel.errors import InvalidRequestError


def test_the_default_is_30_seconds() -> None:
    assert HubConfig().mqtt_resync_interval_s == 30.0
    assert load_hub_config(env={}).mqtt_resync_interval_s == 30.0


def test_the_file_and_the_environment_set_it(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text("[hub]\nmqtt_resync_interval_s = 2.5\n")
    assert load_hub_config(path, env={}).mqtt_resync_interval_s == 2.5
    env = {"MODELFLEET_HUB_MQTT_RESYNC_INTERVAL_S": "4"}
    assert load_hub_config(path, env=env).mqtt_resync_interval_s == 4.0


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_value_that_is_not_positive_is_refused_by_name(value: str) -> None:
    env = {"MODELFLEET_HUB_MQTT_RESYNC_INTERVAL_S": value}
    with pytest.raises(InvalidRequestError, match="mqtt_resync_interval_s must be > 0"):
        load_hub_config(env=env)
