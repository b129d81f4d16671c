"""The request guard's checks as plain functions: no server, no sockets. The same refusals are
checked end to end through a running server in test_bad_input.py."""

from __future__ import annotations

import math

import pytest

from lib.core.errors import ClientError, ConfigError, look_up, unknown
from lib.server.bind import host_given
from lib.server.checks import (
    MAX_ABS_NUMBER,
    MAX_FILENAME_BYTES,
    Route,
    check_filename,
    check_numbers,
    check_query_ints,
    check_range,
    classify,
    parse_json_object,
)


@pytest.mark.parametrize(
    "method, path, route",
    [
        ("POST", "/infer/segmentation", Route("infer", "segmentation")),
        ("POST", "/infer/wsi_v2/segmentation/", Route("infer", "segmentation")),
        ("POST", "/train/segmentation", Route("train", "segmentation")),
        ("POST", "/train/", Route("train", None)),
        ("POST", "/activelearning/hybrid", Route("strategy", "hybrid")),
        ("POST", "/scoring/pants_uncertainty", Route("scoring", "pants_uncertainty")),
        ("POST", "/batch/infer/segmentation", Route("batch", "segmentation")),
        ("PUT", "/datastore/label", Route("upload")),
        ("PUT", "/model/segmentation", Route("upload")),
        ("GET", "/logs/", Route("json-query")),
        ("GET", "/datastore/", Route("none")),
        ("GET", "/info/", Route("none")),
    ],
)
def test_classify(method: str, path: str, route: Route) -> None:
    assert classify(method, path) == route


@pytest.mark.parametrize(
    "raw, expected",
    [("{}", {}), ('{"a": 1}', {"a": 1}), (b'{"x": [1, 2]}', {"x": [1, 2]}), ("", None), ("  ", None)],
)
def test_parse_json_object_accepts(raw: str | bytes, expected: dict | None) -> None:
    assert parse_json_object(raw, "params") == expected


@pytest.mark.parametrize(
    "raw, status, words",
    [
        ("[1, 2]", 400, "params must be a JSON object, got list"),
        ("{bad", 400, "params is not valid JSON"),
        ('{"a": NaN}', 400, "params is not valid JSON"),
        ('{"a": 1e300}', 400, "too large"),
    ],
)
def test_parse_json_object_refuses(raw: str, status: int, words: str) -> None:
    with pytest.raises(ClientError) as err:
        parse_json_object(raw, "params")
    assert err.value.status_code == status and words in str(err.value.detail)


def test_parse_json_object_empty_refused_when_required() -> None:
    with pytest.raises(ClientError, match="params: empty"):
        parse_json_object("", "params", allow_empty=False)


def test_check_numbers_walks_nested_values() -> None:
    check_numbers({"a": [1, 2.5, {"b": -MAX_ABS_NUMBER}]}, "body")
    with pytest.raises(ClientError) as err:
        check_numbers({"a": [1, {"b": math.inf}]}, "body")
    assert err.value.status_code == 400 and "body.a[1].b" in str(err.value.detail)


def test_check_range() -> None:
    check_range({"timeout": 30, "other": -1}, {"timeout": (1, 86_400)}, "params")
    for bad in (0, 10**6, True, "30"):
        with pytest.raises(ClientError) as err:
            check_range({"timeout": bad}, {"timeout": (1, 86_400)}, "params")
        assert err.value.status_code == 422 and "params.timeout" in str(err.value.detail)


def test_check_query_ints() -> None:
    scope = {"query_string": b"lines=20"}
    check_query_ints(scope, {"lines": (1, 100_000)})
    for q in (b"lines=0", b"lines=-5", b"lines=abc", b"lines=" + b"9" * 40):
        with pytest.raises(ClientError) as err:
            check_query_ints({"query_string": q}, {"lines": (1, 100_000)})
        assert err.value.status_code == 422 and "query parameter lines" in str(err.value.detail)


def test_check_filename() -> None:
    check_filename(b"label.nii.gz", "label")
    with pytest.raises(ClientError, match="control characters"):
        check_filename(b"lab\nel.nii.gz", "label")
    with pytest.raises(ClientError, match=f"at most {MAX_FILENAME_BYTES}"):
        check_filename(b"a" * (MAX_FILENAME_BYTES + 1), "label")


@pytest.mark.parametrize(
    "argv, given",
    [
        (["monailabel", "start_server", "--app", "x"], False),
        (["monailabel", "start_server", "--host", "0.0.0.0"], True),
        (["monailabel", "start_server", "--host=::1"], True),
        (["monailabel", "start_server", "--ho", "0.0.0.0"], True),
        (["monailabel", "start_server", "-i", "0.0.0.0"], True),
        (["monailabel", "start_server", "--", "--host", "x"], False),
    ],
)
def test_host_given(argv: list[str], given: bool) -> None:
    assert host_given(argv) is given


def test_look_up_names_every_choice() -> None:
    assert look_up("strategy", "random", {"random", "hybrid"}) == "random"
    with pytest.raises(ClientError) as err:
        look_up("strategy", "nosuch", {"random", "hybrid"}, status=404)
    assert err.value.status_code == 404
    assert err.value.detail == "unknown strategy 'nosuch'; choose one of: hybrid, random"
    assert unknown("model", "x", []) == "unknown model 'x'; choose one of: none"


def test_config_error_is_the_one_error_type() -> None:
    err = ConfigError("--conf preset: 'huge' is not a preset")
    assert isinstance(err, ClientError) and isinstance(err, ValueError)
    assert err.status_code == 400 and str(err) == "--conf preset: 'huge' is not a preset"
