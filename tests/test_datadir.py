"""``server.data_dir``: one directory for every file Weir writes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from proxy.cli import main
from proxy.datadir import default_data_dir, prepare_data_dir
from proxy.settings import SettingsError, load_settings, settings_from_dict

from .harness import body, make_settings, running_mock, running_weir


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/weir:/var/lib/other", "XDG_STATE_HOME": "/x", "HOME": "/home/u"}, "/var/lib/weir"),
        ({"XDG_STATE_HOME": "/x", "HOME": "/home/u"}, "/x/weir"),
        ({"XDG_STATE_HOME": "relative", "HOME": "/home/u"}, "/home/u/.local/state/weir"),  # the spec: ignore it
        ({"HOME": "/home/u"}, "/home/u/.local/state/weir"),
    ],
)
def test_the_default_is_the_service_state_directory(environ: dict[str, str], expected: str) -> None:
    assert default_data_dir(environ) == expected
    assert load_settings(environ=environ).server.data_dir == expected


def test_a_relative_data_dir_is_made_absolute_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={"WEIR_SERVER__DATA_DIR": "data", "HOME": "/home/u"})
    assert s.server.data_dir == str(tmp_path / "data")
    assert s.server.data_path("cache.db") == str(tmp_path / "data" / "cache.db")


def test_the_old_sqlite_path_key_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="sqlite_path"):
        settings_from_dict({"cache": {"sqlite_path": "weir-cache.db"}})


def test_prepare_creates_it_owner_only_and_keeps_an_existing_mode(tmp_path: Path) -> None:
    fresh = tmp_path / "not" / "yet"
    prepare_data_dir(str(fresh))
    assert fresh.stat().st_mode & 0o777 == 0o700  # owner-only: it holds cached prompts and replies
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    prepare_data_dir(str(shared))
    assert shared.stat().st_mode & 0o777 == 0o750  # the operator's choice stands


async def test_the_sqlite_l2_is_written_inside_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data_dir = tmp_path / "data"
    async with running_mock() as (mock, url):
        settings = make_settings(url, cache={"l2": "sqlite"}, server={"data_dir": str(data_dir)})
        prepare_data_dir(settings.server.data_dir)
        async with running_weir(settings) as weir:
            async with httpx.AsyncClient() as client:
                r = await client.post(weir.url + "/v1/messages", content=body(temperature=0), headers={"x-api-key": "k"})
                assert r.status_code == 200
    assert (data_dir / "cache.db").exists()
    assert {p.name for p in data_dir.iterdir()} <= {"cache.db", "cache.db-wal", "cache.db-shm", "cache.db-lock"}
    assert list(cwd.iterdir()) == []


def test_serve_refuses_an_unusable_data_dir_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["serve", "--port", "0", "--data-dir", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "server.data_dir" in err and str(blocker / "sub") in err
