"""tools/conformance.py's own logic: reading a child's results, the gating rule, the
exceptions file, and a hang that must cost one test, not the run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "conformance_tool", ROOT / "tools" / "conformance.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


conformance = _load()


def lines(*records: dict[str, object]) -> list[str]:
    return [json.dumps(record) + "\n" for record in records]


def result(test: str, outcome: str, our_loops: int = 1) -> dict[str, object]:
    return {
        "kind": "result",
        "test": test,
        "outcome": outcome,
        "detail": "Traceback ...\nNotImplementedError" if outcome == "error" else "",
        "seconds": 0.1,
        "our_loops": our_loops,
    }


def meta(*tests: str, not_run: tuple[str, ...] = ()) -> dict[str, object]:
    return {
        "kind": "meta",
        "python": "3.13.0 (main)",
        "platform": "linux",
        "loop_class": "x.Loop",
        "tests": list(tests),
        "not_run": list(not_run),
    }


def run_of(outcomes: dict[str, str], our_loops: int = 1) -> object:
    run = conformance.ModuleRun()
    conformance.absorb(
        run,
        lines(
            meta(*outcomes),
            *(result(name, outcome, our_loops) for name, outcome in outcomes.items()),
        ),
    )
    return run


def test_absorb_reads_results_and_names_the_test_a_dead_child_was_running():
    run = conformance.ModuleRun()
    text = lines(
        meta("m.C.test_a", "m.C.test_b", "m.C.test_c"),
        {"kind": "start", "test": "m.C.test_a"},
        result("m.C.test_a", "pass"),
        {"kind": "start", "test": "m.C.test_b"},
    )
    text.append('{"kind": "result", "test": "m.C.te')  # cut short by the child's death
    running = conformance.absorb(run, text)
    assert running == "m.C.test_b"
    assert run.order == ["m.C.test_a", "m.C.test_b", "m.C.test_c"]
    assert run.tests["m.C.test_a"].outcome == "pass"
    assert run.tests["m.C.test_b"].outcome == "not run"
    assert run.python == "3.13.0 (main)"
    # A restarted child lists only what is left; earlier results stay.
    conformance.absorb(run, lines(meta("m.C.test_c"), result("m.C.test_c", "fail")))
    assert [run.tests[n].outcome for n in run.order] == ["pass", "not run", "fail"]


EXCEPTIONS = """
[[exception]]
tests = ["m.*.test_selector_private*"]
reason = "mocks the selector"

[[exception]]
tests = ["m.C.test_windows_only_gap"]
platforms = ["windows"]
reason = "a Windows reason"

[[not_run]]
tests = ["m.C.test_hangs_everywhere"]
platforms = ["linux"]
versions = ["3.13"]
reason = "hangs on the stock loop too"
"""


def test_gating_rule_counts_only_unlisted_regressions_from_the_stock_loop():
    listing = conformance.load_exceptions(EXCEPTIONS)
    stock = run_of(
        {
            "m.C.test_ok": "pass",
            "m.C.test_regressed": "pass",
            "m.C.test_selector_private_x": "pass",
            "m.C.test_windows_only_gap": "pass",
            "m.C.test_stock_fails": "fail",
            "m.C.test_xfail": "xfail",
            "m.C.test_skipped_on_ours": "pass",
            "m.C.test_missing": "pass",
            "m.C.test_selector_private_fixed": "pass",
        }
    )
    ours = run_of(
        {
            "m.C.test_ok": "pass",
            "m.C.test_regressed": "error",
            "m.C.test_selector_private_x": "fail",
            "m.C.test_windows_only_gap": "hang",
            "m.C.test_stock_fails": "pass",
            "m.C.test_xfail": "xfail",
            "m.C.test_skipped_on_ours": "skip",
            "m.C.test_selector_private_fixed": "pass",
        }
    )
    report = conformance.compare("m", stock, ours, listing, "linux", "3.13")
    assert report.tests == 9
    assert report.stock_passed == 8
    assert report.ours_passed == 3  # ok, xfail, selector_private_fixed
    assert set(report.unexpected) == {
        "m.C.test_regressed",
        "m.C.test_windows_only_gap",  # listed for Windows only
        "m.C.test_skipped_on_ours",  # a skip on ours hides nothing
        "m.C.test_missing",
    }
    assert report.unexpected["m.C.test_regressed"] == "error: NotImplementedError"
    assert report.unexpected["m.C.test_missing"] == "missing from our run"
    assert report.listed == {"m.C.test_selector_private_x": "mocks the selector"}
    assert report.stale == ["m.C.test_selector_private_fixed"]
    assert report.ours_only == ["m.C.test_stock_fails"]
    on_windows = conformance.compare("m", stock, ours, listing, "windows", "3.13")
    assert "m.C.test_windows_only_gap" in on_windows.listed


def test_not_run_patterns_depend_on_platform_and_version():
    listing = conformance.load_exceptions(EXCEPTIONS)
    assert listing.not_run_patterns("linux", "3.13") == ["m.C.test_hangs_everywhere"]
    assert listing.not_run_patterns("linux", "3.12") == []
    assert listing.not_run_patterns("windows", "3.13") == []


@pytest.mark.parametrize(
    "text",
    [
        '[[exception]]\ntests = ["a.B.c"]\n',  # no reason
        '[[exception]]\ntests = []\nreason = "x"\n',
        '[[exception]]\ntests = ["a.B.c"]\nreason = "x"\nplatforms = ["darwin"]\n',
        '[[exceptions]]\ntests = ["a.B.c"]\nreason = "x"\n',  # misspelt table: not ignored
    ],
)
def test_exceptions_file_refuses_entries_without_a_reason_or_with_unknown_keys(text):
    with pytest.raises(ValueError, match=r"reason|platforms|unknown"):
        conformance.load_exceptions(text)


def test_the_committed_exceptions_file_parses_and_every_entry_has_a_reason():
    listing = conformance.load_exceptions(conformance.EXCEPTIONS_FILE.read_text())
    for entry in [*listing.exceptions, *listing.not_run]:
        assert entry.reason and entry.patterns


def test_table_sums_modules_per_runtime():
    listing = conformance.load_exceptions(EXCEPTIONS)
    stock = run_of({"m.C.test_a": "pass", "m.C.test_b": "pass", "m.C.test_c": "skip"})
    ours = run_of({"m.C.test_a": "pass", "m.C.test_b": "fail", "m.C.test_c": "skip"})
    module = conformance.compare("m", stock, ours, listing, "linux", "3.13")
    report = conformance.RuntimeReport(
        "linux-3.13", "3.13.0", "x.Loop", [module, module], 1, 2, False
    )
    row = conformance.table([report]).splitlines()[-1]
    assert row == "| linux-3.13 (3.13.0) | 2 | 2/4 | 4/6 | 4 | 0 | 2 |"
    wine = conformance.RuntimeReport(
        "wine-3.13", "3.13.2", "x.Loop", [module], 1, 2, False, "3.13.0"
    )
    assert (
        conformance.table([wine])
        .splitlines()[-1]
        .startswith("| wine-3.13 (3.13.2, tests of 3.13.0) | 1 | 1/2 |")
    )


FAKE_MODULE = """
import os
import time
import unittest


class T(unittest.TestCase):
    def test_1_pass(self):
        pass

    def test_2_hang(self):
        time.sleep(60)

    def test_3_fail(self):
        self.assertEqual(1, 2)

    def test_4_subtest_fails(self):
        for i in range(2):
            with self.subTest(i=i):
                self.assertLess(i, 1)

    @unittest.skip("not here")
    def test_5_skip(self):
        pass

    def test_6_pass_after_the_hang(self):
        pass

    def test_7_listed_not_run(self):
        raise AssertionError("must not run")
"""


def test_a_hang_costs_one_test_and_the_run_goes_on(tmp_path, monkeypatch):
    package = tmp_path / "lib" / "fakeasyncio"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "test_fake.py").write_text(FAKE_MODULE)
    monkeypatch.setattr(conformance, "OUT", tmp_path / "out")
    runtime = conformance.Runtime(
        "native", "3.x", False, [sys.executable], None, tmp_path, testlib=tmp_path / "lib"
    )
    run = conformance.run_module(
        runtime,
        "stock",
        "test_fake",
        per_test_timeout=3,
        not_run=["test_fake.T.test_7_*"],
        package="fakeasyncio",
    )
    outcomes = {name.split(".")[-1]: run.tests[name].outcome for name in run.order}
    assert outcomes == {
        "test_1_pass": "pass",
        "test_2_hang": "hang",
        "test_3_fail": "fail",
        "test_4_subtest_fails": "fail",
        "test_5_skip": "skip",
        "test_6_pass_after_the_hang": "pass",
    }
    assert run.restarts == 1
    assert run.not_run == ["test_fake.T.test_7_listed_not_run"]
    assert "i=1" in run.tests["test_fake.T.test_4_subtest_fails"].detail
    assert run.seconds < 30
    assert all(run.tests[name].seconds < 10 for name in run.order)
