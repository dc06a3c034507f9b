from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path

import pytest

from shared.config import ConfigError, ServiceConfig, describe, from_env, setting


@dataclass(frozen=True, kw_only=True)
class Demo(ServiceConfig):
    port: int = setting(50099, help="p")
    metrics_port: int = setting(9999, help="m")
    model_dir: Path = setting(help="required folder")
    addrs: tuple[str, ...] = setting(("a:1",), help="list")
    ratio: float = setting(0.5, help="r")
    flag: bool = setting(False, help="f")
    name: str | None = setting(None, help="optional")


P = "MEGASTACK_DEMO_"


def test_reads_typed_values():
    cfg = from_env(
        Demo,
        P,
        {
            P + "MODEL_DIR": "/m",
            P + "ADDRS": "x:1, y:2",
            P + "FLAG": "yes",
            P + "RATIO": "2.5",
            P + "PORT": "0",
        },
    )
    assert (
        cfg.model_dir == Path("/m")
        and cfg.addrs == ("x:1", "y:2")
        and cfg.flag is True
        and cfg.ratio == 2.5
        and cfg.port == 0
    )
    assert cfg.name is None and cfg.metrics_port == 9999


def test_unknown_variable_is_named_with_suggestion():
    with pytest.raises(
        ConfigError,
        match=r"unknown setting MEGASTACK_DEMO_MODEL_DIRR \(did you mean MEGASTACK_DEMO_MODEL_DIR\?\)",
    ):
        from_env(Demo, P, {P + "MODEL_DIR": "/m", P + "MODEL_DIRR": "/x"})


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("PORT", "fifty", "MEGASTACK_DEMO_PORT='fifty' is not an integer"),
        ("FLAG", "maybe", "is not a boolean"),
        ("RATIO", "x", "is not a number"),
        ("LOG_LEVEL", "LOUD", "is not one of DEBUG, INFO, WARNING, ERROR"),
        ("PORT", "70000", "port must be in 0..65535"),
    ],
)
def test_bad_values_fail_with_the_variable_named(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        from_env(Demo, P, {P + "MODEL_DIR": "/m", P + key: value})


def test_missing_required_setting():
    with pytest.raises(ConfigError, match="MEGASTACK_DEMO_MODEL_DIR is required: required folder"):
        from_env(Demo, P, {})


def test_config_is_frozen():
    cfg = from_env(Demo, P, {P + "MODEL_DIR": "/m"})
    with pytest.raises(FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]


def test_describe_lists_every_setting():
    names = [row[0] for row in describe(Demo, P)]
    assert P + "MODEL_DIR" in names and P + "MAX_WORKERS" in names and len(names) == len(set(names))


def test_watch_bounds_follow_the_thread_counts():
    """0 (the default) is half the threads, so a smaller thread count never makes the defaults invalid."""
    from services.converter.config import ConverterConfig
    from services.gateway.config import GatewayConfig

    assert GatewayConfig(threads=2).watchers_limit == 1 and GatewayConfig().watchers_limit == 32
    assert (
        ConverterConfig(max_workers=4).watchers_limit == 2
        and ConverterConfig(max_watchers=3).watchers_limit == 3
    )
    for bad in (GatewayConfig, ConverterConfig):
        with pytest.raises(ValueError, match="max_watchers must be 0"):
            bad(**({"threads": 8} if bad is GatewayConfig else {"max_workers": 8}), max_watchers=8)
