"""TF-IDF + logistic regression on a ferry split: the classical line a fine-tuned model must beat.

Features: word 1-2-grams and character 2-5-grams (within word boundaries), both TF-IDF with
sublinear tf; logistic regression with C chosen on dev accuracy, then scored on dev and test.
The records and their numbering are ferry's (`ferry_dataset::textcls::csv`): Python's csv
DictReader order, the same HTML entities decoded, labels trimmed; the split is a ferry
`split.json`, so the numbers compare with a fine-tuning run on the same split.

It needs scikit-learn, which the project's requirements leave out to keep CI lean:

    .venv/bin/pip install scikit-learn          # or: -r bench/requirements-baselines.txt

Then, from the repository root:

    cargo run -p ferry-dataset --example airline_split -- \\
        ../shared/data/airline/Tweets.csv runs/airline-split-seed0.json 0
    .venv/bin/python bench/tfidf_baseline.py \\
        --csv ../shared/data/airline/Tweets.csv --split runs/airline-split-seed0.json

It prints one JSON line (dev and test accuracy and macro-F1, the chosen C) and a short table.
Reading the CSV needs only the standard library (`read_records`), so ferry's tests can compare
their reader with this one without scikit-learn.
"""

import argparse
import csv
import json
import re
import sys
import time

# The grammar of ferry's `decode_html_entities`: five names and bounded numeric references;
# anything else stays as written. `html.unescape` knows far more and would disagree.
_ENTITY = re.compile(r"&(?:(amp|lt|gt|quot|apos)|#([0-9]{1,7})|#[xX]([0-9a-fA-F]{1,6}));")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def _decode_entity(match):
    name, decimal, hexadecimal = match.groups()
    if name:
        return _NAMED[name]
    code = int(decimal, 10) if decimal else int(hexadecimal, 16)
    if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return match.group(0)
    return chr(code)


def decode_html_entities(text):
    return _ENTITY.sub(_decode_entity, text)


def read_records(path, text_column, label_column):
    """[(text, label)] for every data record, in file order: record i is ferry's record i."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for column in (text_column, label_column):
            if column not in (reader.fieldnames or []):
                sys.exit(f"{path}: no column {column!r} (columns: {reader.fieldnames})")
        return [
            (decode_html_entities(row[text_column]), row[label_column].strip())
            for row in reader
        ]


def load_split(path, num_records, labels):
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    if split["num_records"] != num_records:
        sys.exit(f"{path}: made for {split['num_records']} records, the CSV has {num_records}")
    if split["labels"] != labels:
        sys.exit(f"{path}: made for labels {split['labels']}, the CSV has {labels}")
    seen = [i for part in ("train", "dev", "test") for i in split[part]]
    if len(set(seen)) != len(seen) or not all(0 <= i < num_records for i in seen):
        sys.exit(f"{path}: indices out of range or listed twice")
    return split


def features():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    return FeatureUnion(
        [
            ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True)),
            (
                "char",
                TfidfVectorizer(
                    analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2
                ),
            ),
        ]
    )


def score(gold, predicted, num_labels):
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": accuracy_score(gold, predicted),
        "macro_f1": f1_score(
            gold, predicted, labels=list(range(num_labels)), average="macro", zero_division=0
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", required=True, help="the labelled CSV (e.g. Tweets.csv)")
    parser.add_argument("--split", required=True, help="a ferry split.json for that CSV")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="airline_sentiment")
    parser.add_argument(
        "--c-grid",
        default="0.25,0.5,1,2,4,8,16,32",
        help="comma-separated values of C to try on dev",
    )
    args = parser.parse_args()
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        sys.exit("scikit-learn is missing: .venv/bin/pip install -r bench/requirements-baselines.txt")

    started = time.time()
    records = read_records(args.csv, args.text_column, args.label_column)
    labels = sorted({label for _, label in records})
    index = {label: i for i, label in enumerate(labels)}
    split = load_split(args.split, len(records), labels)
    part = {
        name: ([records[i][0] for i in split[name]], [index[records[i][1]] for i in split[name]])
        for name in ("train", "dev", "test")
    }

    vectorizer = features()
    x_train = vectorizer.fit_transform(part["train"][0])
    x_dev = vectorizer.transform(part["dev"][0])
    x_test = vectorizer.transform(part["test"][0])
    y_train, y_dev, y_test = part["train"][1], part["dev"][1], part["test"][1]

    tried = []
    for c in [float(v) for v in args.c_grid.split(",")]:
        model = LogisticRegression(C=c, max_iter=5000)
        model.fit(x_train, y_train)
        tried.append((score(y_dev, model.predict(x_dev), len(labels)), c, model))
    # Highest dev accuracy; ties to the smaller C (the simpler model).
    best_dev, best_c, best = max(tried, key=lambda t: (t[0]["accuracy"], -t[1]))
    test = score(y_test, best.predict(x_test), len(labels))

    result = {
        "model": "tfidf-logreg",
        "csv": args.csv,
        "split": args.split,
        "seed": split["seed"],
        "sizes": {name: len(split[name]) for name in ("train", "dev", "test")},
        "features": x_train.shape[1],
        "C": best_c,
        "dev": best_dev,
        "test": test,
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(result))
    print(f"{'C':>6}  {'dev acc':>7}  {'dev macro-F1':>12}")
    for dev, c, _ in tried:
        mark = "  <- chosen" if c == best_c else ""
        print(f"{c:>6g}  {dev['accuracy']:>7.4f}  {dev['macro_f1']:>12.4f}{mark}")
    print(f"{'split':>6}  {'acc':>7}  {'macro-F1':>12}")
    for name, s in (("dev", best_dev), ("test", test)):
        print(f"{name:>6}  {s['accuracy']:>7.4f}  {s['macro_f1']:>12.4f}")


if __name__ == "__main__":
    main()
