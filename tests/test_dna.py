"""DNA: the nucleotide tokenizer, FASTA/FASTQ/CSV readers, training on sequence files, k-mer spectra,
and sequence classification (metrics against hand-computed values, a separable set learned to 100 %,
fine-tuning from a pretrained MDLM)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints
from unmask.cli import main
from unmask.config import ConfigError, load_config
from unmask.data.dataset import Data
from unmask.data.labelled import label_names, read_labelled
from unmask.data.readers import DataError, read_fasta, read_fastq, read_table
from unmask.data.tokenization import (
    DNATokenizer,
    OutOfVocabularyError,
    build_tokenizer,
    load_tokenizer,
)
from unmask.eval.classification import classification_metrics
from unmask.eval.generation import kmer_spectrum, kmer_spectrum_distance
from unmask.train.loop import train

from toys import SHARED_DATA, TINY

PROMOTERS = SHARED_DATA / "dna_gue_prom_core_all"


# ----------------------------------------------------------------------------- tokenizer

def test_dna_tokenizer_round_trip_case_and_specials(tmp_path):
    tok = DNATokenizer()
    ids = tok.encode("ACGTNacgtn")
    assert ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert tok.decode(ids) == "ACGTNACGTN"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id, tok.vocab_size) == (5, 6, 7, 8, 9)
    assert tok.decode([tok.bos_id, 0, tok.mask_id, 3, tok.eos_id]) == "AT"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, DNATokenizer) and again.fingerprint() == tok.fingerprint()
    assert build_tokenizer("dna").encode("gattaca").tolist() == [2, 0, 3, 3, 0, 1, 0]


def test_dna_tokenizer_rejects_invalid_symbols_or_maps_them_as_documented():
    with pytest.raises(OutOfVocabularyError, match=r"'X'.*character 4"):
        DNATokenizer().encode("ACGTX")
    with pytest.raises(OutOfVocabularyError, match="'R'"):
        DNATokenizer().encode("ACRT")  # IUPAC ambiguity codes are errors by default
    with pytest.raises(OutOfVocabularyError, match="' '"):
        DNATokenizer().encode("AC GT")
    replaced = build_tokenizer("dna", oov="replace")
    assert replaced.decode(replaced.encode("ACRYKMU")) == "ACNNNNN"
    assert DNATokenizer(oov="drop").decode(DNATokenizer(oov="drop").encode("AXC")) == "AC"
    with pytest.raises(ValueError, match="alphabet"):
        build_tokenizer("dna", alphabet="ACGU")


# ----------------------------------------------------------------------------- readers

def test_fasta_reader_joins_wrapped_lines_across_records(tmp_path):
    path = tmp_path / "x.fa"
    path.write_text(">chr1 first record\nACGTACGT\nacgt\n\nNNAC\n;a comment\n>empty\n>chr2\nGGGG\nTT\n")
    assert list(read_fasta(path)) == [("chr1 first record", "ACGTACGTacgtNNAC"), ("chr2", "GGGGTT")]
    bad = tmp_path / "bad.fasta"
    bad.write_text("ACGT\n>r\nAC\n")
    with pytest.raises(DataError, match=r"bad.fasta:1: sequence before the first '>'"):
        list(read_fasta(bad))


def test_fastq_reader_checks_its_records(tmp_path):
    path = tmp_path / "x.fastq"
    path.write_text("@r1\nACGT\n+\nIIII\n@r2 extra\nGG\n+r2\n!!\n")
    assert list(read_fastq(path)) == [("r1", "ACGT"), ("r2 extra", "GG")]
    path.write_text("@r1\nACGT\n+\nIII\n")
    with pytest.raises(DataError, match="4 bases but 3 quality"):
        list(read_fastq(path))
    path.write_text("r1\nACGT\n+\nIIII\n")
    with pytest.raises(DataError, match="not a FASTQ record"):
        list(read_fastq(path))


def test_tables_read_a_named_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("sequence,label\nACGT,1\nGGCC,0\n")
    assert list(read_table(path, "sequence")) == ["ACGT", "GGCC"]
    assert read_labelled(path, "sequence", "label") == (["ACGT", "GGCC"], ["1", "0"])
    with pytest.raises(DataError, match="no column 'seq'"):
        list(read_table(path, "seq"))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"sequence": "ACGT", "label": 1}\n\n{"sequence": "GG", "label": "neg"}\n')
    assert read_labelled(jsonl, "sequence", "label") == (["ACGT", "GG"], ["1", "neg"])
    jsonl.write_text('{"sequence": "ACGT"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: not a JSON object with 'sequence' and 'label' fields"):
        read_labelled(jsonl, "sequence", "label")
    assert label_names(["1", "0", "10", "2"]) == ["0", "1", "2", "10"]
    assert label_names(["pos", "neg"]) == ["neg", "pos"]


def test_a_fasta_corpus_trains_with_the_dna_tokenizer(tmp_path):
    g = np.random.default_rng(0)
    with open(tmp_path / "genome.fa", "w") as f:
        for r in range(60):
            seq = "".join(g.choice(list("ACGT"), size=40))
            f.write(f">r{r}\n" + "\n".join(seq[i:i + 13] for i in range(0, 40, 13)) + "\n")
    overrides = [*TINY, "data.dataset=text", f"data.path={tmp_path / 'genome.fa'}", "data.tokenizer=dna",
                 "data.layout=pad", "data.length=32", "data.count_bos=false", "data.count_eos=false",
                 f"run_dir={tmp_path / 'run'}", "train.steps=3"]
    data = Data(load_config(None, overrides).data)
    ids, kinds = data.rows("train").get(np.arange(2))
    assert data.tokenizer.kind == "dna" and ids.shape == (2, 32)
    bases = data.tokenizer.decode(ids[0])
    assert bases == data.tokenizer.decode(ids[0][kinds[0] == 0]) and len(bases) == 30
    train(load_config(None, overrides))
    assert main(["eval", str(tmp_path / "run"), "eval.split=valid", "eval.mc_samples=2"]) == 0


def test_kmer_spectrum_distance_closed_forms():
    assert kmer_spectrum(["AAC"], 2) == {"AA": 0.5, "AC": 0.5}
    assert kmer_spectrum(["AC", "CA"], 2) == {"AC": 0.5, "CA": 0.5}  # no k-mer across two texts
    assert kmer_spectrum_distance(["ACGT"], ["ACGT"], 3) == 0.0
    assert kmer_spectrum_distance(["AAAA"], ["CCCC"], 2) == 1.0
    assert kmer_spectrum_distance(["AAC"], ["AAG"], 2) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- classification

def test_classification_metrics_match_hand_computed_values():
    labels = torch.tensor([0, 0, 1, 1])
    p1 = torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.float64)
    m = classification_metrics(torch.stack([1 - p1, p1], 1), labels)
    assert m["auc"] == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs are ordered
    assert m["accuracy"] == pytest.approx(0.75)  # argmax: 0, 0, 0, 1
    # MCC: TP 1, TN 2, FP 0, FN 1 -> (1*2 - 0*1) / sqrt(1 * 2 * 3 * 2)
    assert m["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert m["cross_entropy"] == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.35, 0.8])))


def separable_files(root: Path, n: int = 240, length: int = 20) -> dict[str, Path]:
    """Class 1 sequences carry the motif GGGG at a random place, class 0 ones have no G at all."""
    g = np.random.default_rng(1)
    paths = {}
    for split, count in (("train", n), ("dev", n // 4), ("test", n // 4)):
        rows = ["sequence,label"]
        for i in range(count):
            label = i % 2
            seq = list(g.choice(list("ACT"), size=length))
            if label:
                at = g.integers(0, length - 4)
                seq[at:at + 4] = "GGGG"
            rows.append(f"{''.join(seq)},{label}")
        paths[split] = root / f"{split}.csv"
        paths[split].write_text("\n".join(rows) + "\n")
    return paths


def classifier_overrides(paths, run_dir, *extra):
    return [*TINY, "family=classifier", "data.dataset=text", f"data.path={paths['train']}",
            f"data.valid_path={paths['dev']}", f"data.test_path={paths['test']}", "data.text_field=sequence",
            "data.tokenizer=dna", "data.length=24", f"run_dir={run_dir}", "train.batch_size=32", "train.lr=3e-3",
            "train.eval_every=20", "classifier.dropout=0.0", *extra]


def test_classifier_learns_a_separable_set_to_100_percent(tmp_path, capsys):
    paths = separable_files(tmp_path)
    run = tmp_path / "clf"
    assert main(["train", *classifier_overrides(paths, run, "train.steps=120")]) == 0
    assert "test: AUC 1.0000  accuracy 1.0000  MCC 1.0000" in capsys.readouterr().out
    result = json.loads((run / "test_metrics.json").read_text())
    assert result["test"]["accuracy"] == 1.0 and result["valid"]["auc"] == 1.0
    assert Checkpoint(run).config.classifier.labels == ["0", "1"]  # the resolved config keeps the classes
    assert main(["eval", str(run / "best"), "eval.split=test"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0


def test_classifier_fine_tunes_from_a_pretrained_mdlm(tmp_path):
    paths = separable_files(tmp_path, n=80)
    lm = tmp_path / "lm"
    train(load_config(None, [*TINY, "data.dataset=text", f"data.path={paths['train']}", "data.text_field=sequence",
                             "data.tokenizer=dna", "data.length=24", "data.layout=pad", f"run_dir={lm}",
                             "train.steps=4"]))
    run = tmp_path / "clf"
    cfg = load_config(None, classifier_overrides(paths, run, "train.steps=2", f"train.init_from={lm}", "train.lr=0"))
    train(cfg)
    source = Checkpoint(lm).weights(ema=True)
    tuned = Checkpoint(list_checkpoints(run / "checkpoints")[-1]).weights()
    for name, value in source.items():  # lr 0: the backbone is still exactly the pretrained MDLM
        assert torch.equal(tuned[f"backbone.{name}"], value), name
    with pytest.raises(ConfigError, match="needs a mdlm model"):
        train(load_config(None, classifier_overrides(paths, tmp_path / "x", f"train.init_from={run}")))


def test_classifier_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.valid_path"):
        load_config(None, [*TINY, "family=classifier", "data.dataset=text", "data.path=x.csv"])
    paths = separable_files(tmp_path, n=8)
    (tmp_path / "one.csv").write_text("sequence,label\nACGT,1\nAAAA,1\n")
    with pytest.raises(DataError, match="two classes"):
        train(load_config(None, classifier_overrides({**paths, "train": tmp_path / "one.csv"}, tmp_path / "r")))
    (tmp_path / "bad.csv").write_text("sequence,label\nACGT,1\nACXT,0\n")
    with pytest.raises(DataError, match=r"row 2.*'X'"):
        train(load_config(None, classifier_overrides({**paths, "train": tmp_path / "bad.csv"}, tmp_path / "r")))


@pytest.mark.skipif(not PROMOTERS.is_dir(), reason=f"promoter data not found at {PROMOTERS}")
def test_the_promoter_set_reads_as_70_base_sequences():
    texts, labels = read_labelled(PROMOTERS / "dev.csv", "sequence", "label")
    assert len(texts) == 5920 and set(labels) == {"0", "1"} and {len(t) for t in texts} == {70}
    tok = DNATokenizer()
    assert all(tok.decode(tok.encode(t)) == t for t in texts[:200])
