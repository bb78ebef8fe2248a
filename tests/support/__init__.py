"""Test-support code shared by the test suites (fakes, harnesses); not collected as tests."""
