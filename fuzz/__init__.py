"""Coverage-guided fuzzing of every parser ztagent exposes to untrusted bytes (issue 12).

``python -m fuzz list | run NAME [--runs N] [--seconds S] | all --runs N | replay NAME FILE...``

Engine: atheris (libFuzzer driving instrumented Python bytecode). A target is a module
``fuzz/targets/<name>.py`` with

* ``fuzz_one(data: bytes) -> None`` — feeds ``data`` to the parser; the parser's *documented*
  errors are caught inside (and checked to be the documented type / rule); anything that
  escapes is a bug;
* ``SEEDS: list[bytes]`` — valid and near-valid inputs the corpus starts from;
* optionally ``MAX_LEN: int`` (libFuzzer ``-max_len``, default 4096).

Coverage comes from every project package plus the pure-Python protocol libraries under them
(``runner.INSTRUMENTED``); a target imports what it tests at module level, which is when the
instrumentation happens.

The runner discovers the modules, writes the seeds into ``fuzz/corpus/<name>/`` (the working
corpus, kept between runs, not committed) and makes libFuzzer write crashing inputs to
``fuzz/crashes/<name>/``. Each crash found becomes a regression test under ``tests/`` next to the
code's own tests, plus the fix.
"""
