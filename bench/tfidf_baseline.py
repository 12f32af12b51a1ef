"""The bar every neural model here must clear: TF-IDF features + logistic regression (sklearn),
trained on the same training rows as the other scripts, scored on the official test set.

    python bench/tfidf_baseline.py                    # every training row found
    python bench/tfidf_baseline.py --train-size 4000
"""
import argparse
import sys
import time
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from plumbing import agnews  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data")
    parser.add_argument("--train-size", type=int)
    args = parser.parse_args()
    splits = agnews.load_ag_news(args.data, args.train_size)
    t0 = time.perf_counter()
    # Word uni- and bigrams, sublinear tf: the usual strong setting for news topic classification.
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(splits["train"].texts)
    classifier = LogisticRegression(C=10, max_iter=2000).fit(features, splits["train"].labels)
    probs = classifier.predict_proba(vectorizer.transform(splits["test"].texts))
    test = common.evaluate(probs, splits["test"].labels)
    common.print_report(splits["test"].labels, probs)
    print(f"TF-IDF + logistic regression on {len(splits['train'])} training rows: test accuracy "
          f"{test['accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    common.run_main(main)
