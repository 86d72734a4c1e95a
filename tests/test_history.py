"""The safety history (tests/history.py): the scripts and the checker.

The scripts are run for real, with the clean environment hbmon gives a failover command
(``PATH``, ``LANG``, ``HBMON_*`` only); the checker is fed both their output and
hand-written histories, including broken ones it must reject.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
from history import analyze, append, check, mark, read, write_scripts

from hbmon.failover import command_env


def _run(script: Path, *args: str, token: int | None = None, pair: str = "db1") -> None:
    env = command_env(pair, args[0] if args else "B", "test")
    if token is not None:
        env["HBMON_FENCING_TOKEN"] = str(token)
    subprocess.run([str(script), *args], env=env, check=True, timeout=30)


def _line(t: float, site: str, event: str, token: int | None = None, pair: str = "db1") -> str:
    return json.dumps({"t": t, "site": site, "pair": pair, "event": event, "token": token})


def _mark(t: float, site: str, event: str) -> str:
    return json.dumps({"t": t, "site": site, "pair": None, "event": event})


# -- the scripts ---------------------------------------------------------------------------


def test_the_scripts_append_one_line_each_on_the_monotonic_clock(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    promote, demote = write_scripts(tmp_path / "bin", history)
    before = time.clock_gettime(time.CLOCK_MONOTONIC)
    _run(demote, "A", "db1", token=4)
    _run(promote, "B", "db1", token=5)
    after = time.clock_gettime(time.CLOCK_MONOTONIC)
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    assert [(x["site"], x["pair"], x["event"], x["token"]) for x in lines] == [
        ("A", "db1", "demote", 4),
        ("B", "db1", "promote", 5),
    ]
    assert before < lines[0]["t"] < lines[1]["t"] < after
    report = check(history, initial_owner={"db1": "A"}, initial_token={"db1": 4})
    assert report.primary_at("db1", -1e9) == ["A"]
    assert report.primary_at("db1", after) == ["B"]
    assert report.handovers("db1") == [pytest.approx(lines[1]["t"] - lines[0]["t"])]


def test_a_slow_demote_stamps_when_it_has_finished(tmp_path: Path) -> None:
    history = tmp_path / "h.jsonl"
    _, demote = write_scripts(tmp_path, history)
    _run(demote, "A", "db1", "0.3", token=1)
    (doc,) = [json.loads(x) for x in history.read_text().splitlines()]
    assert doc["t"] - doc["t_start"] >= 0.3


def test_without_arguments_the_scripts_use_hbmon_s_environment(tmp_path: Path) -> None:
    history = tmp_path / "h.jsonl"
    promote, _ = write_scripts(tmp_path, history)
    env = command_env("db7", "tokyo", "host_down") | {"HBMON_FENCING_TOKEN": "12"}
    subprocess.run([str(promote)], env=env, check=True, timeout=30)
    (event,) = read(history)[0]
    assert (event.site, event.pair, event.event, event.token) == ("tokyo", "db7", "promote", 12)


def test_concurrent_commands_never_mix_their_lines(tmp_path: Path) -> None:
    history = tmp_path / "h.jsonl"
    promote, _ = write_scripts(tmp_path, history)
    procs = [
        subprocess.Popen([str(promote), "B", f"p{i}"], env={"HBMON_FENCING_TOKEN": str(i)})
        for i in range(24)
    ]
    for proc in procs:
        assert proc.wait(30) == 0
    events, problems = read(history)
    assert problems == []
    assert sorted(e.pair for e in events) == sorted(f"p{i}" for i in range(24))
    check(history)  # one promote per pair: safe


# -- the checker: what passes ------------------------------------------------------------


def test_a_clean_failover_passes_and_is_described() -> None:
    report = check(
        [_line(10.0, "A", "demote", 1), _line(12.5, "B", "promote", 2)],
        initial_owner={"db1": "A"},
        initial_token={"db1": 1},
    )
    assert [(iv.site, iv.start, iv.end, iv.token) for iv in report.intervals["db1"]] == [
        ("A", -math.inf, 10.0, 1),
        ("B", 12.5, math.inf, 2),
    ]
    assert report.handovers("db1") == [2.5]
    assert report.tokens == {"db1": [2]}
    assert report.primary_at("db1", 11.0) == []
    assert "1 promotes, 1 demotes, 0 violations" in report.summary()


def test_lines_are_ordered_by_their_clock_not_by_their_place_in_the_file() -> None:
    # B's promote was appended first but stamped after A's demote finished
    check(
        [_line(12.0, "B", "promote", 2), _line(11.0, "A", "demote", 1)],
        initial_owner={"db1": "A"},
    )


def test_a_demote_of_a_site_that_is_not_primary_is_harmless_and_listed() -> None:
    report = check(
        [_line(5.0, "B", "demote", None), _line(6.0, "A", "demote", 1)],
        initial_owner={"db1": "A"},
    )
    assert [(e.site, e.t) for e in report.idle_demotes] == [("B", 5.0)]


def test_pairs_are_independent() -> None:
    report = check(
        [
            _line(1.0, "A", "demote", 1, pair="x"),
            _line(2.0, "B", "promote", 2, pair="x"),
            _line(3.0, "A", "promote", 7, pair="y"),
        ],
        initial_owner={"x": "A", "y": "A"},
    )
    assert report.primary_at("x", 2.5) == ["B"]
    assert report.primary_at("y", 2.5) == ["A"]


# -- the checker: what fails ---------------------------------------------------------------


def test_a_promote_before_the_old_primary_s_demote_is_caught(tmp_path: Path) -> None:
    """The broken order, produced by the real scripts: B promotes, then A demotes."""
    history = tmp_path / "history.jsonl"
    promote, demote = write_scripts(tmp_path / "bin", history)
    _run(promote, "B", "db1", token=2)
    _run(demote, "A", "db1", token=1)
    with pytest.raises(AssertionError) as caught:
        check(history, initial_owner={"db1": "A"})
    message = str(caught.value)
    assert "overlap on db1: B promoted at t=" in message
    assert "while A was still primary" in message
    assert 'promote: line 1: {"t": ' in message  # the offending lines themselves
    assert 'until line 2: {"t": ' in message
    report = analyze(history, initial_owner={"db1": "A"})
    assert report.overlaps == 1
    t = report.promotes()[0].t
    assert sorted(report.primary_at("db1", t)) == ["A", "B"]


def test_two_promotes_without_a_demote_between_are_an_overlap() -> None:
    lines = [_line(1.0, "A", "promote", 1), _line(2.0, "B", "promote", 2)]
    with pytest.raises(AssertionError, match=r"B promoted at t=2\.0+ while A was still"):
        check(lines)
    # and with the demote in between, the same promotes are fine
    check([lines[0], _line(1.5, "A", "demote", 1), lines[1]])


def test_a_promote_at_the_very_instant_of_the_demote_counts_as_an_overlap() -> None:
    with pytest.raises(AssertionError, match="overlap"):
        check([_line(5.0, "A", "demote", 1), _line(5.0, "B", "promote", 2)], {"db1": "A"})


def test_a_token_that_does_not_increase_is_caught() -> None:
    lines = [
        _line(1.0, "A", "demote", 3),
        _line(2.0, "B", "promote", 4),
        _line(3.0, "B", "demote", 4),
        _line(4.0, "A", "promote", 4),  # fail-back with the same token: not fenced
    ]
    with pytest.raises(AssertionError) as caught:
        check(lines, initial_owner={"db1": "A"})
    message = str(caught.value)
    assert "token not increasing on db1: 4 after 4" in message
    assert "line 4:" in message
    assert "overlap on" not in message


def test_a_first_token_not_above_the_initial_term_is_caught() -> None:
    lines = [_line(1.0, "A", "demote", 5), _line(2.0, "B", "promote", 5)]
    check(lines, initial_owner={"db1": "A"})  # without the initial term: nothing to compare
    with pytest.raises(AssertionError, match="5 after 5 \\(the initial term\\)"):
        check(lines, initial_owner={"db1": "A"}, initial_token={"db1": 5})


def test_a_re_promote_by_the_primary_still_needs_a_higher_token() -> None:
    with pytest.raises(AssertionError, match="2 after 3"):
        check([_line(1.0, "A", "promote", 3), _line(2.0, "A", "promote", 2)])


def test_a_promote_without_a_token_is_caught() -> None:
    with pytest.raises(AssertionError, match="token missing"):
        check([_line(1.0, "B", "promote", None)])


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '["a list"]',
        '{"t": 1.0, "site": "A", "pair": "db1"}',
        '{"t": "soon", "site": "A", "pair": "db1", "event": "promote", "token": 1}',
        '{"t": NaN, "site": "A", "pair": "db1", "event": "promote", "token": 1}',
        '{"t": 1.0, "site": "", "pair": "db1", "event": "promote", "token": 1}',
        '{"t": 1.0, "site": "A", "pair": "db1", "event": "started", "token": 1}',
        '{"t": 1.0, "site": "A", "pair": "db1", "event": "promote", "token": "7"}',
        '{"t": 1.0, "site": "A", "pair": "db1", "event": "promote", "token": true}',
    ],
)
def test_a_broken_line_never_passes(text: str) -> None:
    with pytest.raises(AssertionError, match="malformed line 1"):
        check([text])


def test_append_writes_what_read_parses(tmp_path: Path) -> None:
    history = tmp_path / "h.jsonl"
    append(history, {"t": 1.0, "site": "A", "pair": "db1", "event": "demote", "token": 1})
    append(history, {"t": 2.0, "site": "B", "pair": "db1", "event": "promote", "token": 2})
    events, problems = read(history)
    assert problems == []
    assert [e.line for e in events] == [1, 2]
    assert check(history, {"db1": "A"}).handovers("db1") == [1.0]


# -- crashes and freezes (marks written by the fault injector) -------------------------------


def test_a_crash_ends_every_primary_of_that_site(tmp_path: Path) -> None:
    history = tmp_path / "h.jsonl"
    t = mark(history, "A", "crash")
    append(history, json.loads(_line(t + 1, "B", "promote", 2, pair="x")))
    append(history, json.loads(_line(t + 1, "B", "promote", 2, pair="y")))
    report = check(history, initial_owner={"x": "A", "y": "A"}, initial_token={"x": 1, "y": 1})
    assert report.primary_at("x", t + 0.5) == []
    assert report.primary_at("y", t + 2) == ["B"]
    # without the crash mark the same promotes are overlaps
    with pytest.raises(AssertionError, match="overlap on x"):
        check(history.read_text().splitlines()[1:], initial_owner={"x": "A", "y": "A"})


FREEZE = [
    _mark(1.0, "A", "pause"),
    _line(5.0, "B", "promote", 2),  # A's lease expired while A was frozen
    _mark(9.0, "A", "resume"),
    _line(9.05, "A", "demote", 1),  # demoted on resume, before any beat
]


def test_a_primary_frozen_past_its_lease_that_demotes_on_resume_is_fenced() -> None:
    report = check(FREEZE, {"db1": "A"}, {"db1": 1}, resume_grace=1.0)
    assert report.violations == []
    (fenced,) = report.fenced
    assert "thawed at t=9.000000 and demoted 0.050 s later" in fenced
    assert "token 1 < 2" in fenced
    assert report.frozen == {"A": [(1.0, 9.0)]}


def test_without_a_grace_a_thawed_primary_s_late_demote_is_an_overlap() -> None:
    with pytest.raises(AssertionError, match=r"overlap on db1.*\(0\.050 s both active\)"):
        check(FREEZE, {"db1": "A"}, {"db1": 1})


def test_a_thawed_primary_that_demotes_too_late_is_an_overlap() -> None:
    late = [*FREEZE[:3], _line(10.5, "A", "demote", 1)]
    with pytest.raises(AssertionError, match=r"1\.500 s both active"):
        check(late, {"db1": "A"}, {"db1": 1}, resume_grace=1.0)


def test_a_thawed_primary_is_only_fenced_by_a_lower_token() -> None:
    with pytest.raises(AssertionError, match="overlap"):
        check(FREEZE, {"db1": "A"}, resume_grace=1.0)  # its term unknown: not shown fenced
    same = [FREEZE[0], _line(5.0, "B", "promote", 1), *FREEZE[2:]]
    with pytest.raises(AssertionError, match="overlap") as caught:
        check(same, {"db1": "A"}, {"db1": 1}, resume_grace=1.0)
    assert "token not increasing" in str(caught.value)


def test_a_promote_just_after_the_thaw_is_fenced_like_one_during_the_freeze() -> None:
    racing = [FREEZE[0], FREEZE[2], _line(9.02, "B", "promote", 2), FREEZE[3]]
    report = check(racing, {"db1": "A"}, {"db1": 1}, resume_grace=1.0)
    assert len(report.fenced) == 1


def test_an_overlap_with_a_primary_that_never_froze_is_never_excused() -> None:
    lines = [_line(5.0, "B", "promote", 2), _line(5.05, "A", "demote", 1)]
    with pytest.raises(AssertionError, match="overlap"):
        check(lines, {"db1": "A"}, {"db1": 1}, resume_grace=10.0)


def test_a_primary_frozen_until_it_crashed_never_acted_again() -> None:
    lines = [_mark(1.0, "A", "pause"), _line(5.0, "B", "promote", 2), _mark(7.0, "A", "crash")]
    report = check(lines, {"db1": "A"}, {"db1": 1})
    assert "frozen throughout" in report.fenced[0]


def test_a_primary_still_frozen_at_the_end_is_frozen_throughout() -> None:
    lines = [_mark(1.0, "A", "pause"), _line(5.0, "B", "promote", 2)]
    report = check(lines, {"db1": "A"}, {"db1": 1})
    assert report.frozen == {"A": [(1.0, math.inf)]}
    assert len(report.fenced) == 1


def test_marks_are_site_wide_and_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not one of"):
        mark(tmp_path / "h", "A", "promote")
    bad = json.dumps({"t": 1.0, "site": "A", "pair": "db1", "event": "pause"})
    with pytest.raises(AssertionError, match="site-wide"):
        check([bad])
