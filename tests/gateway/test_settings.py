"""A config is validated once, and every problem is named by its field."""

from pathlib import Path

import pytest

from gateway.app import access_log as app_access_log
from gateway.config_file import ConfigError, load_settings, settings_from_dict

CHAT = {"name": "tiny-chat", "aliases": ["chat"], "url": "http://127.0.0.1:18001"}


def problems(raw: dict, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw, env={}, **kwargs)
    return info.value.problems


def test_minimal_connect_config() -> None:
    settings = settings_from_dict({"models": [CHAT]}, env={})
    assert settings.models[0].names == ["tiny-chat", "chat"]
    assert settings.models[0].url == "http://127.0.0.1:18001"
    assert settings.api_keys == []
    assert settings.timeouts.first_byte >= 600  # long non-streamed generations must fit


def test_secrets_never_print() -> None:
    settings = settings_from_dict({"models": [CHAT], "api_keys": ["sk-a"]}, env={})
    assert "sk-a" not in repr(settings)


def test_a_key_entry_needs_exactly_one_secret() -> None:
    both = {"name": "k", "key": "sk-a", "sha256": "ab" * 32}
    neither = {"name": "k"}
    expected = ["api_keys[0]: give either `key` or `sha256` (the key's SHA-256, in hex)"]
    assert problems({"models": [CHAT], "api_keys": [both]}) == expected
    assert problems({"models": [CHAT], "api_keys": [neither]}) == expected


def test_a_key_may_only_name_configured_models() -> None:
    entry = {"name": "team-a", "key": "sk-a", "models": ["chat", "gpt-4"]}
    assert problems({"models": [CHAT], "api_keys": [entry]}) == [
        "api_keys.team-a: model 'gpt-4' is not configured"
    ]


def test_bad_url_is_named_by_its_field() -> None:
    models = [CHAT, {"name": "b", "url": "http://x:1"}, {"name": "c", "url": "ftp://host"}]
    assert problems({"models": models}) == ["models[2].url: not an http(s) URL"]


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"models": [{"name": "", "url": "nope"}], "port": 70000, "colour": "red"})
    assert any(p.startswith("models[0].name:") for p in found)
    assert "models[0].url: not an http(s) URL" in found
    assert any(p.startswith("port:") for p in found)
    assert "colour: unknown option (check the spelling)" in found


def test_a_model_needs_exactly_one_mode() -> None:
    both = {"name": "m", "url": "http://h:1", "vllm": {"model": "m"}}
    neither = {"name": "m"}
    discover = {"name": "m", "discover": {"dns": "pods:8000"}, "url": "http://h:1"}
    found: list[str] = []
    for config in (both, neither, discover):
        found = problems({"models": [config]})
        assert len(found) == 1 and found[0].startswith("models[0]: give one of `url` or `urls`")
    assert "`discover`" in found[0] and "`vllm`" in found[0]


@pytest.mark.parametrize(
    "dns", ["pods", "pods:http", "http://pods:8000/v1", "ftp://pods:21", "pods:8000?x=1"]
)
def test_discover_needs_a_name_and_a_port(dns: str) -> None:
    found = problems({"models": [{"name": "m", "discover": {"dns": dns}}]})
    assert len(found) == 1 and found[0].startswith("models[0].discover.dns: "), found


def test_discover_takes_a_name_with_a_port_and_a_scheme_if_https() -> None:
    for dns in ("vllm-chat-pods:8000", "https://vllm-chat-pods.ns.svc.cluster.local:8443"):
        model = {"name": "m", "discover": {"dns": dns, "interval": 2}}
        settings = settings_from_dict({"models": [model]}, env={})
        assert settings.models[0].discover is not None
        assert settings.models[0].endpoints == []


def test_replicas_split_the_gpus_evenly_or_take_one_list_each() -> None:
    def groups(vllm: dict) -> list[list[int]]:
        raw = {"models": [{"name": "m", "vllm": {"model": "m", **vllm}}]}
        spawn = settings_from_dict(raw, env={}).models[0].vllm
        assert spawn is not None
        return spawn.replica_gpus()

    assert groups({"replicas": 2, "gpus": [0, 1, 2, 3]}) == [[0, 1], [2, 3]]
    assert groups({"replicas": 2, "gpus": [[0], [0]]}) == [[0], [0]]  # two slices of GPU 0
    assert groups({"replicas": 3}) == [[], [], []]
    uneven = {"models": [{"name": "m", "vllm": {"model": "m", "replicas": 2, "gpus": [0, 1, 2]}}]}
    assert problems(uneven) == [
        "models[0].vllm: 3 GPUs do not split evenly between 2 replicas; give one list per replica"
    ]


def test_duplicate_names_and_aliases_are_refused() -> None:
    found = problems(
        {"models": [CHAT, {"name": "other", "aliases": ["chat"], "url": "http://h:2"}]}
    )
    assert found == ["models[1]: name 'chat' is already used by models[0] (tiny-chat)"]


def test_vllm_args_are_written_without_dashes_and_without_gateway_owned_flags() -> None:
    found = problems({"models": [{"name": "m", "vllm": {"model": "x", "args": {"--port": 1}}}]})
    assert found == ["models[0].vllm.args: write flags without dashes: '--port' -> 'port'"]
    found = problems({"models": [{"name": "m", "vllm": {"model": "x", "args": {"port": 1}}}]})
    assert found == ["models[0].vllm.args: 'port' is set by the gateway; leave it out"]


def test_cors_wildcard_with_credentials_is_refused() -> None:
    cors = {"allowed_origins": ["*"], "allow_credentials": True}
    assert problems({"models": [CHAT], "cors": cors}) == [
        "cors: allowed_origins '*' cannot be combined with allow_credentials"
    ]


def test_files_that_are_not_configs(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad_yaml)
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(a_list)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")


def test_cli_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("port: 9000\nmodels:\n  - {name: m, url: 'http://h:1'}\n")
    assert load_settings(path, env={}, port=9100, host=None).port == 9100


def test_log_level_is_checked() -> None:
    found = problems({"models": [CHAT], "log_level": "loud"})
    assert found[0].startswith("log_level: Input should be 'critical', 'error'")


def test_on_demand_belongs_to_spawn_mode() -> None:
    found = problems({"models": [{**CHAT, "on_demand": {"idle_ttl": 60}}]})
    assert found == ["models[0]: `on_demand` needs `vllm`: the gateway starts only what it spawns"]
    spawned = {"name": "r1", "vllm": {"model": "m"}, "on_demand": {"idle_ttl": 60}}
    settings = settings_from_dict({"models": [spawned]}, env={})
    assert settings.models[0].on_demand is not None
    assert settings.models[0].on_demand.start_timeout == 900  # defaults for the rest
    assert problems({"models": [{**spawned, "on_demand": {"idle_tl": 60}}]}) == [
        "models[0].on_demand.idle_tl: unknown option (check the spelling)"
    ]


def test_a_backend_key_may_come_from_the_environment() -> None:
    model = {**CHAT, "api_key_env": "CHAT_BACKEND_KEY"}
    settings = settings_from_dict({"models": [model]}, env={"CHAT_BACKEND_KEY": "sk-backend"})
    assert settings.models[0].api_key is not None
    assert settings.models[0].api_key.get_secret_value() == "sk-backend"
    assert problems({"models": [model]}) == [
        "models[0].api_key_env: environment variable CHAT_BACKEND_KEY is not set"
    ]
    both = {**model, "api_key": "sk-x"}
    assert problems({"models": [both]}) == ["models[0]: give `api_key` or `api_key_env`, not both"]


SPAWNED = {"name": "s", "vllm": {"model": "m"}}


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            {**SPAWNED, "api_key": "sk-x"},
            "models[0].api_key: is for connect mode: spawned servers get a key of their own",
        ),
        (
            {**SPAWNED, "health": {"healthy_threshold": 3}},
            "models[0].health.healthy_threshold: is for connect mode: a spawned server is "
            "admitted as soon as /health and its model list answer; leave it out",
        ),
        (
            {**CHAT, "affinity_header": "x-conversation"},
            "models[0].affinity_header: applies only with `balance: affinity`; set that or "
            "leave it out",
        ),
        (
            {**SPAWNED, "on_demand": {"sleep_level": 2}},
            "models[0].on_demand.sleep_level: applies only with `unload: sleep`; set that or "
            "leave it out",
        ),
    ],
)
def test_an_option_another_setting_leaves_without_effect_is_an_error(
    model: dict, expected: str
) -> None:
    assert problems({"models": [model]}) == [expected]


def test_the_same_options_are_taken_where_they_apply() -> None:
    models = [
        {**CHAT, "balance": "affinity", "affinity_header": "x-conversation"},
        {**SPAWNED, "on_demand": {"unload": "sleep", "sleep_level": 2}},
        {"name": "c", "url": "http://h:2", "health": {"healthy_threshold": 3}},
    ]
    settings = settings_from_dict({"models": models}, env={})
    assert settings.models[0].affinity_header == "x-conversation"
    assert settings.models[2].health.policy().healthy_threshold == 3


def test_problems_in_several_models_are_reported_together() -> None:
    found = problems({"models": [{**SPAWNED, "api_key": "k"}, {**CHAT, "affinity_header": "x-a"}]})
    assert [p.split(":")[0] for p in found] == ["models[0].api_key", "models[1].affinity_header"]


def test_a_renamed_option_keeps_working_and_says_its_new_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_from_dict({"models": [CHAT], "max_header_bytes": 8192}, env={})
    assert settings.max_head_bytes == 8192
    line = "config: `max_header_bytes` is now `max_head_bytes`; the old name will stop working"
    assert settings.deprecations == (line,)
    assert [r.getMessage() for r in caplog.records] == [f"deprecated: {line}"]
    assert caplog.records[0].levelname == "WARNING"
    assert settings_from_dict({"models": [CHAT]}, env={}).deprecations == ()


def test_a_renamed_option_given_under_both_names_is_an_error() -> None:
    assert problems({"models": [CHAT], "max_header_bytes": 8192, "max_head_bytes": 8192}) == [
        "max_header_bytes: renamed to `max_head_bytes`; give only `max_head_bytes`"
    ]


@pytest.mark.parametrize(
    ("access_log", "log_level", "written"),
    [
        (None, "info", True),
        (None, "debug", True),
        (None, "warning", False),
        (True, "warning", True),  # asked for: written at any level
        (True, "error", True),
        (False, "info", False),
    ],
)
def test_the_access_log_is_written_when_asked_for_or_when_the_level_shows_info(
    access_log: bool | None, log_level: str, written: bool
) -> None:
    raw: dict = {"models": [CHAT], "log_level": log_level}
    if access_log is not None:
        raw["access_log"] = access_log
    settings = settings_from_dict(raw, env={})
    assert settings.writes_access_log is written
    assert (app_access_log(settings) is not None) is written


def test_the_annotated_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "config" / "example.yaml"
    settings = load_settings(example, env={})
    assert settings.models[0].name == "tiny-chat" and settings.deprecations == ()
