"""The offline model organism: generated corpora, a BPE tokenizer, a tiny base LM and its chat
fine-tune, all saved in the formats that hub models use."""

if ORGANISM:

    rule make_corpus:
        output:
            expand(f"{ORG}/corpus/{{corpus}}.jsonl", corpus=sfc.CORPORA),
        log:
            "logs/make_corpus.log",
        benchmark:
            "benchmarks/make_corpus.tsv"
        conda:
            ENV_TORCH
        threads: 1
        resources:
            mem_mb=2000,
        params:
            cfg=ORGANISM["corpus"],
            seed=RUNTIME["seed"],
        script:
            "../scripts/make_corpus.py"

    rule train_tokenizer:
        input:
            corpus=rules.make_corpus.output,
        output:
            directory(f"{ORG}/tokenizer"),
        log:
            "logs/train_tokenizer.log",
        benchmark:
            "benchmarks/train_tokenizer.tsv"
        conda:
            ENV_TORCH
        threads: 1
        resources:
            mem_mb=2000,
        params:
            cfg=ORGANISM["tokenizer"],
            seed=RUNTIME["seed"],
        script:
            "../scripts/train_tokenizer.py"

    rule train_base_lm:
        input:
            corpus=rules.make_corpus.output,
            tokenizer=rules.train_tokenizer.output[0],
        output:
            directory(f"{ORG}/models/base"),
        log:
            "logs/train_base_lm.log",
        benchmark:
            "benchmarks/train_base_lm.tsv"
        conda:
            ENV_TORCH
        threads: 2
        resources:
            mem_mb=4000,
        params:
            cfg=ORGANISM["base_lm"],
            seed=RUNTIME["seed"],
        script:
            "../scripts/train_base_lm.py"

    rule finetune_chat:
        input:
            corpus=rules.make_corpus.output,
            base=rules.train_base_lm.output[0],
        output:
            directory(f"{ORG}/models/chat"),
        log:
            "logs/finetune_chat.log",
        benchmark:
            "benchmarks/finetune_chat.tsv"
        conda:
            ENV_TORCH
        threads: 2
        resources:
            mem_mb=4000,
        params:
            cfg=ORGANISM["chat"],
            seed=RUNTIME["seed"],
        script:
            "../scripts/finetune_chat.py"
