"""The suite's own rules: a skip fails the run unless it is on the allow-list
(tests/skip_policy.py), a run that collects no test fails, and XLA compiles without its
expensive passes except for tests marked `optimized` (tests/conftest.py)."""

import os

import jax
import pytest

from tests import skip_policy

SUITE = {
    "test_a": """
import pytest
def test_ok():
  pass
def test_skipped():
  pytest.skip("needs torch")
""",
    "test_b": """
import pytest
pytest.importorskip("no_such_module_anywhere")
def test_never_collected():
  pass
""",
}


def test_a_skip_fails_the_run_and_is_listed(pytester):
  pytester.makepyfile(**SUITE)
  result = pytester.runpytest("-p", "tests.skip_policy")
  assert result.ret == pytest.ExitCode.TESTS_FAILED
  result.assert_outcomes(passed=1, skipped=2)
  result.stdout.fnmatch_lines(["*ALLOWED_SKIPS*", "test_b.py: *no_such_module_anywhere*",  # at collection
                               "test_a.py::test_skipped: *needs torch*"])


def test_skips_on_the_allow_list_pass(pytester, monkeypatch):
  pytester.makepyfile(**SUITE)
  monkeypatch.setitem(skip_policy.ALLOWED_SKIPS, "test_a.py::test_skipped", "a reason")
  assert pytester.runpytest("-p", "tests.skip_policy").ret == pytest.ExitCode.TESTS_FAILED  # test_b still
  monkeypatch.setitem(skip_policy.ALLOWED_SKIPS, "test_b.py", "another reason")
  result = pytester.runpytest("-p", "tests.skip_policy")
  assert result.ret == pytest.ExitCode.OK
  result.assert_outcomes(passed=1, skipped=2)


def test_no_tests_is_a_failure(pytester):
  pytester.makepyfile(test_empty="")
  assert pytester.runpytest("-p", "tests.skip_policy").ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_the_suite_compiles_without_expensive_passes():
  assert jax.config.values["jax_disable_most_optimizations"] is True
  assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"  # and so do the processes it starts


@pytest.mark.optimized
def test_an_optimized_test_compiles_with_them():
  assert jax.config.values["jax_disable_most_optimizations"] is False
  assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "0"
