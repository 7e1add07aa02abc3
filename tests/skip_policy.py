"""pytest plugin: a skipped test fails the run unless it is on ALLOWED_SKIPS.

A skip hides whatever the test would have found (a missing test extra, an import that broke), so
the suite counts it as a failure. Deselection (-m 'not slow', -k) is not a skip. Loaded by
tests/conftest.py; tests/test_suite.py checks it on a suite of its own.
"""

from __future__ import annotations

import pytest

# Node id (or a prefix of one) → why skipping it is acceptable. Keep it short: every entry is a
# check that does not run. Empty: nothing in this suite may skip.
ALLOWED_SKIPS: dict[str, str] = {}


class SkipPolicy:
  def __init__(self, allowed: dict[str, str]):
    self.allowed = allowed
    self.refused: list[tuple[str, str]] = []

  def _note(self, report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
      return
    if any(report.nodeid.startswith(prefix) for prefix in self.allowed):
      return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    self.refused.append((report.nodeid or "(collection)", reason))

  def pytest_runtest_logreport(self, report):
    self._note(report)

  def pytest_collectreport(self, report):  # a whole module skipped while importing
    self._note(report)

  def pytest_terminal_summary(self, terminalreporter):
    if self.refused:
      terminalreporter.section("skipped, and not on tests/skip_policy.py's ALLOWED_SKIPS: a failure",
                               sep="=", red=True)
      for nodeid, reason in self.refused:
        terminalreporter.line(f"{nodeid}: {reason}")

  @pytest.hookimpl(trylast=True)
  def pytest_sessionfinish(self, session, exitstatus):
    if self.refused and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
      session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
  config.pluginmanager.register(SkipPolicy(ALLOWED_SKIPS), "cxflax-skip-policy")
