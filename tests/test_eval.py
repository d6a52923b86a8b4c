"""`rerankd eval`: metrics equal to trec_eval's, BM25 first stage, reranking in process and through a server,
drift between variants, and clear errors for broken BEIR folders."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import ir_measures
import pytest
import scipy.stats
from ir_measures import RR, R, nDCG

from rerankd.bench.processes import free_port
from rerankd.cli import main
from rerankd.quality.beir import load_judged_beir
from rerankd.quality.bm25 import BM25Index
from rerankd.quality.eval import MEASURES, evaluate, split_model_spec
from rerankd.quality.metrics import kendall_tau_b

from conftest import SHARED_DATA
from serving import running_server

# trec_eval's measures, via ir_measures' pytrec_eval backend. trec_eval's recip_rank takes no cutoff, but
# the first relevant document is in the top 10 exactly when its reciprocal rank is >= 1/10: RR@10 below.
REFERENCE = {"nDCG@10": nDCG @ 10, "RR": RR, "Recall@10": R @ 10, "Recall@100": R @ 100}
SMALL = ["--queries", "2", "--k", "8"]  # bf16 runs at a few pairs/s on a CPU without bf16 units


@pytest.fixture(scope="session")
def dbpedia_dir() -> Path:
    """BEIR-format DBpedia-Entity subset: titled passages, a qrels header line, labels 0-2."""
    path = SHARED_DATA / "dbpedia-entity-subset"
    if not path.exists():
        pytest.skip(f"shared material not present: {path}")
    return path


def reference_per_query(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """trec_eval's numbers, keyed like ours."""
    names = {measure: name for name, measure in REFERENCE.items()}
    values: dict[str, dict[str, float]] = {}
    for metric in ir_measures.pytrec_eval.iter_calc(list(REFERENCE.values()), qrels, run):
        values.setdefault(metric.query_id, {})[names[metric.measure]] = metric.value
    for query in values.values():
        reciprocal_rank = query.pop("RR")
        query["MRR@10"] = reciprocal_rank if reciprocal_rank >= 1 / 10 else 0.0
    return values


def ours_per_query(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {
        qid: {name: metric(qrels[qid], docs) for name, metric in MEASURES.items()}
        for qid, docs in run.items()
    }


def flat(per_query: dict[str, dict[str, float]]) -> dict[tuple[str, str], float]:
    """(query, measure) -> value, which pytest.approx compares (it does not descend into nested dicts)."""
    return {(qid, name): value for qid, values in per_query.items() for name, value in values.items()}


def test_metrics_equal_trec_eval_on_a_fixed_run_with_ties() -> None:
    qrels = {
        # graded labels, a relevant document never retrieved (d9), a negative label (no gain)
        "q1": {"d1": 3, "d2": 2, "d3": 0, "d4": 1, "d5": 2, "d9": 1, "d10": -1},
        # every score tied: trec_eval orders by document id, descending (c, b, a)
        "q2": {"a": 1, "b": 0, "c": 2},
        # the only relevant document ranks 11th: nothing at 10, found at 100
        "q3": {f"n{i:02}": 0 for i in range(1, 11)} | {"n11": 2},
        # ties across the cut at 10 and ids whose string order is not their numeric order
        "q4": {"d2": 1, "d10": 2, "d11": 3, "d100": 1},
    }
    run = {
        "q1": {"d3": 0.9, "d1": 0.5, "d2": 0.5, "d6": 0.5, "d10": 0.4, "d4": 0.2, "d5": 0.1},
        "q2": {"a": 0.3, "b": 0.3, "c": 0.3},
        "q3": {f"n{i:02}": 1.0 - i / 100 for i in range(1, 15)},
        "q4": {f"d{i}": 1.0 if i % 3 else 0.5 for i in (1, 2, 3, 9, 10, 11, 12, 20, 30, 100, 101, 111)},
    }
    expected = reference_per_query(qrels, run)
    assert flat(ours_per_query(qrels, run)) == pytest.approx(flat(expected), abs=1e-12)
    reversed_run = {qid: dict(reversed(docs.items())) for qid, docs in run.items()}
    assert ours_per_query(qrels, reversed_run) == ours_per_query(qrels, run)  # input order never matters
    assert expected["q2"]["MRR@10"] == 1.0  # c, the relevant one, wins the tie on its id
    assert expected["q3"]["Recall@10"] == 0.0 and expected["q3"]["Recall@100"] == 1.0


@pytest.mark.parametrize("dataset", ["msmarco", "dbpedia"])
def test_bm25_run_measured_like_trec_eval(dataset: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue("msmarco_dir" if dataset == "msmarco" else "dbpedia_dir")
    data = load_judged_beir(folder)
    report = evaluate(data, [], k=100)
    (bm25,) = report.systems
    assert len(report.queries) == len(data.query_ids) > 30
    expected = reference_per_query(data.dataset.judgments, bm25.run)
    assert flat(bm25.per_query) == pytest.approx(flat(expected), abs=1e-12)
    assert bm25.mean("nDCG@10") > 0.3  # real retrieval, not noise: BM25 finds what the judges found


def test_bm25_breaks_ties_like_trec_eval_and_survives_stopword_queries() -> None:
    index = BM25Index({"b": "apple pie", "a": "apple pie", "c": "apple pie", "d": "banana bread"})
    assert list(index.top_k("apple", 2)) == ["c", "b"]
    assert index.top_k("the of", 3) == {"d": 0.0, "c": 0.0, "b": 0.0}


def test_kendall_tau_b_equals_scipy_with_ties() -> None:
    generator = random.Random(7)
    for _ in range(20):
        first = [round(generator.random(), 1) for _ in range(25)]
        second = [round(x + generator.gauss(0, 0.1), 1) for x in first]
        assert kendall_tau_b(first, second) == pytest.approx(scipy.stats.kendalltau(first, second).statistic)
    assert kendall_tau_b([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert kendall_tau_b([0.5, 0.5], [0.1, 0.2]) != kendall_tau_b([0.5, 0.5], [0.1, 0.2])  # NaN: undefined


def test_model_spec_takes_a_dtype_suffix() -> None:
    assert split_model_spec("models/x@bfloat16") == ("models/x", "bfloat16")
    assert split_model_spec("models/x") == ("models/x", None)
    assert split_model_spec("me@host/model") == ("me@host/model", None)


def test_reads_header_line_and_titles(dbpedia_dir: Path) -> None:
    data = load_judged_beir(dbpedia_dir)
    assert data.absent == [] and data.warnings() == []
    assert "query-id" not in data.dataset.judgments
    first = next(iter(data.dataset.passages.values()))
    assert first.startswith("Oceanic Airlines Oceanic Airlines and")  # title, then text


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rerankd", "eval", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def fp32_and_bf16(
    xsmall_model_dir: Path, msmarco_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """One in-process run of the model in float32 and bfloat16 with every output, shared by the tests."""
    out = tmp_path_factory.mktemp("eval")
    model = str(xsmall_model_dir)
    outputs = [
        "--json",
        str(out / "eval.json"),
        "--markdown",
        str(out / "eval.md"),
        "--plot",
        str(out / "eval.png"),
    ]
    completed = run_cli(
        "--data",
        str(msmarco_dir),
        "--model",
        f"{model}@float32",
        "--model",
        f"{model}@bfloat16",
        *SMALL,
        *outputs,
    )
    assert completed.returncode == 0, completed.stderr
    return {"stdout": completed.stdout, "out": out, "json": json.loads((out / "eval.json").read_text())}


@pytest.mark.slow
def test_in_process_reports_quality_and_drift(fp32_and_bf16: dict, xsmall_model_dir: Path) -> None:
    body = fp32_and_bf16["json"]
    assert body["dataset"] == "msmarco-dl19-subset" and body["k"] == 8 and len(body["queries"]) == 2
    labels = [system["label"] for system in body["systems"]]
    assert labels == ["BM25", f"{xsmall_model_dir}@float32", f"{xsmall_model_dir}@bfloat16"]
    for system in body["systems"]:
        assert set(system["metrics"]) == set(MEASURES)
        assert all(0.0 <= value <= 1.0 for value in system["metrics"].values())
        assert set(system["per_query"]) == set(body["queries"])
    # reranking the same candidates cannot change what is among them
    assert len({system["metrics"]["Recall@100"] for system in body["systems"]}) == 1
    (drift,) = body["drift"]
    assert drift["base"] == labels[1] and drift["variant"] == labels[2]
    assert 0.0 < drift["mean_abs_delta"] <= drift["max_abs_delta"] < 0.05  # bf16 rounding, not noise
    assert -1.0 <= drift["kendall_tau"] <= 1.0
    assert 0.0 <= drift["top1_agreement"] <= 1.0 and 0.0 <= drift["ndcg10_changed"] <= 1.0

    stdout = fp32_and_bf16["stdout"]
    assert "| system" in stdout and "nDCG@10" in stdout and "Kendall τ" in stdout
    assert stdout.strip() in (fp32_and_bf16["out"] / "eval.md").read_text()
    assert (fp32_and_bf16["out"] / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.network
def test_through_a_running_server_equals_in_process(
    fp32_and_bf16: dict, xsmall_model_dir: Path, msmarco_dir: Path, tmp_path: Path
) -> None:
    serve = ["--model", str(xsmall_model_dir), "--served-model-name", "xs", "--dtype", "float32"]
    with running_server(serve, tmp_path / "log") as url:
        completed = run_cli(
            "--data",
            str(msmarco_dir),
            "--url",
            url,
            "--model",
            "xs",
            *SMALL,
            "--json",
            str(tmp_path / "e.json"),
        )
    assert completed.returncode == 0, completed.stderr
    served = json.loads((tmp_path / "e.json").read_text())["systems"]
    assert served[1]["label"] == "xs"
    in_process = fp32_and_bf16["json"]["systems"]
    assert flat(served[1]["per_query"]) == pytest.approx(flat(in_process[1]["per_query"]), abs=1e-9)
    assert served[0] == in_process[0]  # the same BM25 candidates


@pytest.mark.slow
def test_dbpedia_with_a_model(xsmall_model_dir: Path, dbpedia_dir: Path) -> None:
    completed = run_cli("--data", str(dbpedia_dir), "--model", str(xsmall_model_dir), *SMALL)
    assert completed.returncode == 0, completed.stderr
    assert "dbpedia-entity-subset (test): 2 judged queries" in completed.stdout
    assert str(xsmall_model_dir) in completed.stdout and "drift" not in completed.stdout


def write_beir(folder: Path, qrels: str, queries: str | None = None, corpus: str | None = None) -> Path:
    """A tiny BEIR folder: three passages, two queries, the given qrels."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        corpus
        or "".join(
            json.dumps({"_id": pid, "title": "", "text": text}) + "\n"
            for pid, text in [("p1", "apple pie recipe"), ("p2", "banana bread"), ("p3", "cherry tart")]
        )
    )
    (folder / "queries.jsonl").write_text(
        queries or '{"_id": "q1", "text": "apple pie"}\n{"_id": "q2", "text": "bread"}\n'
    )
    (folder / "qrels" / "test.tsv").write_text(qrels)
    return folder


GOOD_QRELS = "query-id\tcorpus-id\tscore\nq1\tp1\t2\nq2\tp2\t1\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"qrels": "q1\tp1\t1\nq9\tp2\t1\nq8\tp2\t1\n"}, "line 2: query id 'q9' is not in"),
        ({"qrels": "q1\tp1\t1\nq2\tp2\tyes\n"}, "line 2: score 'yes' is not an integer"),
        ({"qrels": "q1 p1 1\n"}, "line 1: expected 3 tab-separated fields"),
        ({"qrels": "q1\tp1\t0\n"}, "no judged query has a relevant (label >= 1) document"),
        (
            {"queries": '{"_id": "q1", "text": " "}\n{"_id": "q2", "text": "b"}\n'},
            "query 'q1' has empty text",
        ),
        ({"corpus": '{"_id": "p1", "text": "x"}\n{"_id": "p2", "text": \n'}, "corpus.jsonl line 2: not JSON"),
        ({"corpus": '{"id": "p1", "text": "x"}\n'}, 'corpus.jsonl line 1: expected an object with "_id"'),
    ],
)
def test_broken_data_is_refused_naming_the_file_and_problem(
    change: dict[str, str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_beir(tmp_path / "beir", **{"qrels": GOOD_QRELS, **change})
    assert main(["eval", "--data", str(folder)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(folder) in error and "Traceback" not in error


def test_missing_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_beir(tmp_path / "beir", GOOD_QRELS)
    assert main(["eval", "--data", str(folder), "--split", "dev"]) == 2
    assert "qrels/dev.tsv does not exist" in capsys.readouterr().err
    (folder / "queries.jsonl").unlink()
    assert main(["eval", "--data", str(folder)]) == 2
    assert f"{folder / 'queries.jsonl'} does not exist" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "absent")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_judgments_of_absent_documents_are_counted_and_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_beir(tmp_path / "beir", GOOD_QRELS + "q1\tp7\t3\nq2\tp8\t1\n")
    assert main(["eval", "--data", str(folder), "--json", str(tmp_path / "e.json")]) == 0
    captured = capsys.readouterr()
    assert "warning: 2 judgments" in captured.err and "'p7'" in captured.err
    assert "| BM25" in captured.out
    body = json.loads((tmp_path / "e.json").read_text())
    assert body["systems"][0]["metrics"]["Recall@10"] == 1.0  # recall over the corpus' relevant documents
    assert "2 judgments" in body["notes"][0]


class LengthScorer:
    """A stand-in model: a document's score is its length / 100, plus `bump` for documents starting with c."""

    def __init__(self, label: str, bump: float = 0.0) -> None:
        self.label = label
        self._bump = bump

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        return [len(doc) / 100 + (self._bump if doc.startswith("c") else 0.0) for doc in documents]

    def close(self) -> None:
        pass


def test_drift_of_a_variant_from_known_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = load_judged_beir(write_beir(tmp_path / "beir", GOOD_QRELS))
    rerankers = [lambda: LengthScorer("base"), lambda: LengthScorer("variant", bump=0.02)]
    report = evaluate(data, rerankers, k=3, progress=True)
    assert "base: 100%" in capsys.readouterr().err  # the progress bar
    # base: p1 .16 > p2 .12 > p3 .11; the variant lifts p3 to .13, above p2, in both queries
    (drift,) = report.drift
    assert drift.max_abs_delta == pytest.approx(0.02)
    assert drift.mean_abs_delta == pytest.approx(0.04 / 6)
    assert drift.kendall_tau == pytest.approx(1 / 3)  # 2 of 3 pairs kept, 1 swapped
    assert (drift.top1_agreement, drift.ndcg_changed, drift.queries) == (2, 1, 2)  # q2's p2 drops to 3rd


def test_option_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = str(write_beir(tmp_path / "beir", GOOD_QRELS))
    assert main(["eval", "--data", folder, "--url", "http://127.0.0.1:1"]) == 2
    assert "--url needs the served model names" in capsys.readouterr().err
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert main(["eval", "--data", folder, "--url", unreachable, "--model", "xs"]) == 1
    assert unreachable in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    assert main(["eval", "--data", folder, "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'rerankd[plot]'" in capsys.readouterr().err
