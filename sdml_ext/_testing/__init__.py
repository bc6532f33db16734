"""Hooks for sdml_ext's own tests, shipped because the code they observe is. Inert: every hook
is a no-op (one environment lookup) unless an ``SDML_TEST_*`` variable is set, which only the
test suite does. Nothing here is public API."""
