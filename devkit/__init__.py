"""Development kit: what the tests and the benchmarks both run on, kept outside both.

One home, so that no benchmark imports the test suite and no test imports a benchmark:
the tiny test model (`tiny_model`, its training recipe `tiny_profile`, the shipped copy and
its build cache `tiny_base`), and the doubles the bot runs against (`fake_discord`,
`fake_vllm`, `scripted_model`). Not installed with the product; importable from the
repository root, as `tests` and `benchmarks` are.
"""
