"""search.py and app.py check every value through their typed schemas (config/schema.py
SearchConfig, AppConfig) before any work, as train, infer and evaluate do."""

import pytest

from config.entry import prepare
from config.schema import compose_config
from runtime.errors import UserError

BASE = ["path=/nonexistent/run", "gallery=/nonexistent/photos"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("k=0", "k=0 must be a whole number from 1"),
        ("k=-3", "k=-3 must be a whole number from 1"),
        ("batch_size=0", "batch_size=0 must be a whole number from 1"),
        ("num_workers=-1", "num_workers=-1 must be a whole number from 0"),
        ("index.kind=foo", "index.kind='foo' must be one of"),
        ("index.save_every_s=0", "index.save_every_s=0.0 must be a finite number > 0"),
        ("query_mode=sideways", "query_mode='sideways' must be one of"),
    ],
)
def test_search_refuses_a_bad_value_before_any_work(override, message):
    with pytest.raises(UserError, match=message):
        prepare(compose_config("config-search", BASE + [override]), "search")


@pytest.mark.parametrize("override", ["k=abc", "index.save_every_s=abc"])
def test_search_refuses_a_wrong_type_at_composition(override):
    with pytest.raises(UserError, match="config overrides"):
        compose_config("config-search", BASE + [override])


@pytest.mark.parametrize(
    "override,message",
    [
        ("k=0", "k=0 must be a whole number from 1 to 100"),
        ("k=101", "k=101 must be a whole number from 1 to 100"),
        ("port=0", "port=0 must be a whole number from 1 to 65535"),
        ("max_upload_mb=0", "max_upload_mb=0.0 must be a finite number > 0"),
        ("precision=fp8", "precision='fp8' must be one of"),
    ],
)
def test_app_refuses_a_bad_value_before_any_work(override, message):
    with pytest.raises(UserError, match=message):
        prepare(compose_config("config-app", BASE + [override]), "app")


@pytest.mark.parametrize("override", ["port=abc", "index.hnsw_m=many"])
def test_app_refuses_a_wrong_type_at_composition(override):
    with pytest.raises(UserError, match="config overrides"):
        compose_config("config-app", BASE + [override])


@pytest.mark.parametrize("name,kind", [("config-search", "search"), ("config-app", "app")])
def test_a_misspelt_key_is_refused_with_the_nearest_name(name, kind):
    with pytest.raises(UserError, match="gallary is not a setting .*did you mean gallery"):
        prepare(compose_config(name, BASE + ["+gallary=/photos"]), kind)


def test_the_defaults_pass():
    prepare(compose_config("config-search", BASE + ["text=a kite"]), "search")
    prepare(compose_config("config-app", BASE), "app")
