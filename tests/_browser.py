"""Helpers for the report tests: tiny report inputs and a network-less headless Chromium.

The sample inputs carry hostile dataset text (`XSS`, `SCRIPT_BREAK`) in every place where dataset
text reaches a page, so each page test doubles as an escaping test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

XSS = "<img src=x onerror=alert(1)>"
SCRIPT_BREAK = "</script><script>alert(2)</script>"
NEURONPEDIA_ID = "gemma-2-2b/12-gemmascope-res-16k"

# Chromium flags: headless, no GPU, and no way to reach the network (every host name resolves to
# nothing and every connection goes to a dead proxy), so a CDN reference would fail loudly.
# SwiftShader is opted into explicitly because Chromium no longer falls back to software WebGL
# silently, and scattergl / scatter3d need WebGL on machines without a GPU.
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--window-size=1200,900",
)
CI_INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


def umap_tokens(n_seq: int = 4, length: int = 5) -> dict[int, list[str]]:
    """Decoded tokens per sequence: sequence 1 holds the hostile text, sequence 2 "needle"."""
    tokens = {}
    for s in range(n_seq):
        words = [f" w{s}_{p}" for p in range(length)]
        if s == 1:
            words[2] = " " + XSS
        if s == 2:
            words[1] = " needle"
        tokens[s] = words
    return tokens


def umap_frame(n_seq: int = 4, length: int = 5, dims: int = 2) -> pd.DataFrame:
    """Embedding rows as the umap stage writes them (hover strings are not used by the page)."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n_seq):
        for p in range(length):
            row = {
                "seq_id": s,
                "pos": p,
                "x": float(rng.normal()),
                "y": float(rng.normal()),
                "role": int([0, 1, 2][p % 3]),
            }
            if dims == 3:
                row["z"] = float(rng.normal())
            rows.append(row)
    df = pd.DataFrame(rows)
    df["seq_id"] = df["seq_id"].astype("int32")
    df["pos"] = df["pos"].astype("int32")
    df["role"] = df["role"].astype("int8")
    return df


def write_tokens(path: Path, tokens: dict[int, list[str]]) -> Path:
    """A tokens parquet (seq_id, tokens) as the tokenize stage writes it."""
    pd.DataFrame(
        {"seq_id": pd.Series(list(tokens), dtype="int32"), "tokens": list(tokens.values())}
    ).to_parquet(path)
    return path


def diffing_frame(n_features: int = 6, models: tuple[str, str] = ("base", "chat")) -> pd.DataFrame:
    """features.parquet rows for two token types; feature 3 is exclusive for the first model,
    inconsistent (active on the second model's control prompts) and hostile."""
    rng = np.random.default_rng(1)
    exclusive = ["none", models[1], "both", models[0]]
    rows = []
    for tt in ("model", "newline"):
        for f in range(n_features):
            row: dict[str, Any] = {"token_type": tt, "feature_id": f}
            for m in models:
                row[f"{m}_target_num_active"] = int(rng.integers(0, 20))
                row[f"{m}_control_num_active"] = int(rng.integers(0, 10))
                row[f"{m}_target_all_mean"] = float(rng.random())
                row[f"{m}_target_sparsity"] = float(rng.random())
            row["exclusive"] = exclusive[f % 4]
            row["inconsistent"] = f == 3
            row["description"] = f"feature about {XSS} {SCRIPT_BREAK}" if f == 3 else f"desc {f}"
            rows.append(row)
    return pd.DataFrame(rows)


DIFF_SUMMARY = {
    "n_target": {"model": 40, "newline": 20},
    "n_control": {"model": 30, "newline": 10},
    "exclusive": {"base": 3, "chat": 3, "both": 3, "none": 3},
}
DIFF_ANALYSIS = {
    "type": "diffing",
    "name": "intro",
    "models": ["base", "chat"],
    "sae": "scope12",
    "target": "intro",
    "control": "control",
    "metrics": ["target_all_mean", "target_sparsity"],
}
UMAP_ANALYSIS = {
    "type": "umap",
    "name": "pred_alpaca",
    "model": "chat",
    "dataset": "alpaca",
    "sae": "temporal12",
    "codes": "pred",
    "hover_window": 3,
    "report": {"lines": "all"},
}
MODELS_INFO = {
    "base": {"name": "org/tiny-base", "layer": 2},
    "chat": {"name": "org/tiny-chat", "layer": 2},
}
SIM_ANALYSIS = {
    "type": "similarity",
    "name": "sim",
    "model": "chat",
    "dataset": "alpaca",
    "sae": "temporal12",
}
SIM_TOKENS = {0: ["<bos>", "the", XSS, "the", "\n"], 7: ["<bos>", "a", "b"]}
CONFIG = {
    "runtime": {"device": "auto", "seed": 0},
    "datasets": {"x": {"source": "file", "path": f"prompts/{XSS}.jsonl"}},
    "analyses": [DIFF_ANALYSIS, UMAP_ANALYSIS],
}


def write_similarity_inputs(directory: Path) -> tuple[Path, Path]:
    """`{seq_id}.parquet` matrices + manifest and a tokens parquet; returns (manifest, tokens)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for seq, toks in SIM_TOKENS.items():
        n = len(toks)
        a = rng.normal(size=(n, 4))
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        sim = a @ a.T
        pd.DataFrame(sim, columns=[str(i) for i in range(n)]).to_parquet(
            directory / f"{seq}.parquet"
        )
    (directory / "manifest.json").write_text("{}\n")
    tokens = directory.parent / "tokens.parquet"
    pd.DataFrame(
        {
            "seq_id": pd.Series(list(SIM_TOKENS), dtype="int32"),
            "tokens": list(SIM_TOKENS.values()),
        }
    ).to_parquet(tokens)
    return directory / "manifest.json", tokens


def write_metrics_inputs(directory: Path) -> list[Path]:
    """Two metrics JSON files in the metrics/{model}/{dataset}/{sae}.json layout."""
    paths = []
    for sae, values in {
        "topk": {"variance_explained": 0.8, "mse": 0.01, "l0_total": 16, "dead_fraction": 0.1},
        "temporal": {
            "variance_explained": 0.9,
            "mse": 0.005,
            "l0_novel": 5.5,
            "l0_pred": 10.0,
            "l0_total": 15.5,
            "ce_recovered": None,
            "n_tokens": 1000,
        },
    }.items():
        path = directory / "metrics" / "chat" / "stories" / f"{sae}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
        paths.append(path)
    return paths


def build_all_reports(root: Path) -> dict[str, Path]:
    """Every page + index under root/reports, from inputs under root/in."""
    from saeflow.report import (
        write_diffing_page,
        write_index,
        write_metrics_page,
        write_similarity_page,
        write_umap_page,
    )

    inputs = root / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    reports = root / "reports"
    emb = inputs / "embedding.parquet"
    umap_frame().to_parquet(emb)
    umap_tok = write_tokens(inputs / "umap_tokens.parquet", umap_tokens())
    feats = inputs / "features.parquet"
    diffing_frame().to_parquet(feats)
    summary = inputs / "summary.json"
    summary.write_text(json.dumps(DIFF_SUMMARY))
    manifest, tokens = write_similarity_inputs(inputs / "similarity")
    metrics = write_metrics_inputs(inputs)

    pages = {
        "umap": write_umap_page(
            emb, None, reports / "umap-pred_alpaca.html", UMAP_ANALYSIS, tokens_path=umap_tok
        ),
        "diffing": write_diffing_page(
            feats,
            summary,
            reports / "diffing-intro.html",
            DIFF_ANALYSIS,
            NEURONPEDIA_ID,
            models_info=MODELS_INFO,
        ),
        "similarity": write_similarity_page(
            manifest, tokens, reports / "similarity-sim.html", SIM_ANALYSIS
        ),
        "metrics": write_metrics_page(
            metrics, reports / "metrics-all.html", labels=["topk", f"temporal {XSS}"]
        ),
    }
    pages["index"] = write_index(list(pages.values()), CONFIG, reports / "index.html")
    return pages


def find_chromium() -> tuple[str, str] | None:
    """(browser binary, chromedriver) if both are installed."""
    browser = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def make_driver(profile_dir: Path):
    """A headless Chromium with no network, browser console logs captured."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    assert found is not None, f"chromium/chromedriver not installed; on CI run: {CI_INSTALL}"
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def load(driver, path: Path, ready: bool = True, timeout: float = 20.0) -> list[dict]:
    """Open a page from disk, wait for the plot, and return its browser console entries."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")
    driver.get(path.resolve().as_uri())
    if ready:
        WebDriverWait(driver, timeout).until(
            lambda d: d.execute_script("return window.SAEFLOW_READY === true")
        )
    return driver.get_log("browser")


def severe(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e.get("level") == "SEVERE"]


def read_shards(page: Path) -> dict[tuple[str, int], Any]:
    """Every shard beside a page: (set, k) -> data, parsed back from `saeflowShard(...)`."""
    import re

    from saeflow.report.shards import data_dir

    out = {}
    pattern = re.compile(r'^saeflowShard\("([^"]+)", "([^"]+)", (\d+), (.*)\);\n$', re.DOTALL)
    for path in sorted(data_dir(page).glob("*.js")):
        match = pattern.match(path.read_text(encoding="utf-8"))
        assert match, path
        assert match.group(1) == page.stem
        out[(match.group(2), int(match.group(3)))] = json.loads(match.group(4))
    return out


def dashboard_frames(n_features: int = 6, n_examples: int = 3, logits: bool = True):
    """(feature_index, examples) frames as the top_examples stage writes them; feature 1 never
    fires, feature 2's tokens and example are hostile, feature 0 fires on " king"."""
    import html as _html

    rng = np.random.default_rng(3)
    n_active = rng.integers(1, 1000, n_features)
    if n_features > 1:
        n_active[1] = 0
    tokens = [
        [" king", "queen"] if f == 0 else [XSS, f"t{f}"] if f == 2 else [f"t{f}"]
        for f in range(n_features)
    ]
    index = pd.DataFrame(
        {
            "feature_id": np.arange(n_features, dtype=np.int32),
            "n_active": n_active,
            "density": n_active / 1e4,
            "max_act": rng.random(n_features) + 1,
            "mean_act": rng.random(n_features),
            "hist_lo": np.zeros(n_features),
            "hist_hi": np.ones(n_features),
            "hist_counts": [[int(c) for c in rng.integers(0, 9, 8)] for _ in range(n_features)],
            "top_tokens": [t if n_active[f] else [] for f, t in enumerate(tokens)],
            "top_token_counts": [[2] * len(t) if n_active[f] else [] for f, t in enumerate(tokens)],
        }
    )
    if logits:
        index["top_logit_tokens"] = [[f"up{f}", SCRIPT_BREAK] for f in range(n_features)]
        index["top_logit_values"] = [[1.5, 1.0] for _ in range(n_features)]
        index["bottom_logit_tokens"] = [[f"down{f}"] for f in range(n_features)]
        index["bottom_logit_values"] = [[-1.0] for _ in range(n_features)]
    rows = []
    for f in range(n_features):
        if not n_active[f]:
            continue
        for r in range(n_examples):
            word = XSS if f == 2 else f"word{f}"
            rows.append(
                {
                    "feature_id": f,
                    "rank": r,
                    "activation": float(n_examples - r),
                    "context_html": f"ctx <b>{_html.escape(word)}</b> {r}",
                }
            )
    return index, pd.DataFrame(rows)


def decoder_frame(n_per_sae: int = 4, saes: tuple[str, ...] = ("a", "b"), dims: int = 2):
    """Decoder UMAP rows: two SAEs, feature 1 of SAE a has hostile tokens."""
    rng = np.random.default_rng(4)
    rows = []
    for s in saes:
        for f in range(n_per_sae):
            row = {
                "sae": s,
                "feature_id": f,
                "x": float(rng.normal()),
                "y": float(rng.normal()),
                "top_tokens": [XSS] if (s, f) == ("a", 1) else [" king"] if f == 0 else [f"t{f}"],
                "top_logit_tokens": [f"l{f}"],
            }
            if dims == 3:
                row["z"] = float(rng.normal())
            rows.append(row)
    return pd.DataFrame(rows)


DECODER_PARTNERS = {"a:0": [["b", 0, 0.9, True]], "b:0": [["a", 0, 0.9, True]]}


def mfa_frames(R: int = 4, n: int = 30):
    """(nll, contexts, subspace, summary) frames of a small MFA run with hostile tokens."""
    rng = np.random.default_rng(5)
    nll = pd.DataFrame(
        {"epoch": [0, 1, 2], "train_nll": [3.0, 2.0, 1.5], "val_nll": [3.1, 2.2, 1.7]}
    ).assign(best=[False, False, True])
    contexts = pd.DataFrame(
        {
            "component": [0, 0, 1],
            "shown": [True, True, True],
            "rank": [0, 1, 0],
            "context": ["the ", f"a {XSS} ", "x"],
            "token": ["cat", SCRIPT_BREAK, "y"],
            "log_lik": [-1.0, -2.0, -3.0],
        }
    )
    subspace = pd.DataFrame(
        {
            "component": [i % 2 for i in range(n)],
            "coords": [list(rng.normal(size=R)) for _ in range(n)],
            "token": [XSS if i == 0 else f"tok{i}" for i in range(n)],
            "seq_id": list(range(n)),
            "pos": [1] * n,
            "resp": [0.9] * n,
        }
    )
    summary = {
        "components": [
            {"component": 0, "size": 15, "pi": 0.5, "top_tokens": [[XSS, 2]]},
            {"component": 1, "size": 15, "pi": 0.5, "top_tokens": [["y", 1]]},
        ]
    }
    return nll, contexts, subspace, summary


def build_geometry_pages(reports: Path) -> dict[str, Path]:
    """Dashboard, decoder UMAP and MFA pages under `reports`."""
    from saeflow.report import write_dashboard_page, write_decoder_umap_page, write_mfa_page

    index, examples = dashboard_frames()
    nll, contexts, subspace, summary = mfa_frames()
    return {
        "dashboard": write_dashboard_page(
            reports / "geometry-dash.html",
            index,
            examples,
            analysis={"name": "dash", "sae": "topk", "model": "chat", "dataset": "d"},
        ),
        "decoder": write_decoder_umap_page(
            reports / "geometry-dec.html",
            decoder_frame(),
            DECODER_PARTNERS,
            analysis={"name": "dec"},
        ),
        "mfa": write_mfa_page(
            reports / "mfa-m.html",
            title=f"MFA {XSS}",
            nll=nll,
            contexts=contexts,
            subspace=subspace,
            summary=summary,
            model_config={"K": 2, "R": 4},
        ),
    }
