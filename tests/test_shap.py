"""shapley.py's Shapley values of words (analyze.py --shap and --contrast), by hand. The
combinatorics on a game whose values are known by hand; on tiny random models: efficiency (exact
and sampled), sampling with every order drawn equal to exact enumeration, a word the model cannot
see getting 0, absent words unseen by every head and by the LSTMs; then both flags end to end on a
tiny trained run (needs AG News rows)."""
import itertools
import re

import matplotlib.image
import numpy as np
import pytest
import torch

import analyze
import bert
import common
import explain
import shapley
import train_lstm
from plumbing import classifiers
from conftest import needs_rows

# A WordPiece vocabulary small enough to read: "playstation" is "play" + "##station", "webs" is
# "web" + "##s"; any other word is [UNK] (still a word, still a player).
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "oracle", "software", "profit",
         "rise", "market", "shares", "new", "play", "##station", "game", "sells", "record", "bank",
         "chip", "web", "##s"]
SIX_WORDS = "Oracle software profit rise the market"
FOURTEEN_WORDS = ("the new PlayStation game sells record shares as Oracle software profit "
                  "and bank chip")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    # vocab.txt -> BertWordPieceTokenizer, as for a model folder
    return common.load_tokenizer(folder)


def tiny_bert(head="pooler", layers=2, seed=0, **head_kwargs):
    torch.manual_seed(seed)
    cfg = bert.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=layers,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = classifiers.bert_classifier(bert.BertModel(cfg), head, 0.0, **head_kwargs).eval()
    with torch.no_grad():  # a random classifier's logits differ by ~0.1; scale them up to ~1
        model.classifier.weight.mul_(10)
    return model


def tiny_lstm(arch, seed=0):
    torch.manual_seed(seed)
    return train_lstm.build_model({"vocab_size": len(VOCAB), "arch": arch, "embed_dim": 16,
                                   "hidden_size": 16, "dropout": 0.0}).eval()


def ids_of(tokenizer, text):
    return torch.from_numpy(common.encode(tokenizer, [text], 64)[0])


# --------------------------------------------------------------------------------------------------
# Words and the combinatorics
# --------------------------------------------------------------------------------------------------
def test_pieces_join_the_word_before_and_specials_are_no_words(tokenizer):
    tokens = [tokenizer.id_to_token(int(i))
              for i in ids_of(tokenizer, "The PlayStation sells webs")]
    assert tokens == ["[CLS]", "the", "play", "##station", "sells", "web", "##s", "[SEP]"]
    words, word_of = shapley.group_words(tokens)
    assert words == ["the", "playstation", "sells", "webs"]
    np.testing.assert_array_equal(word_of, [-1, 0, 1, 1, 2, 3, 3, -1])
    # a word vocabulary (train_lstm.py --vocab word): every token is a word, none special
    assert shapley.group_words(["oracle", "[UNK]", "profit"])[0] == ["oracle", "[UNK]", "profit"]


def known_game(coalitions):
    """f(S) = 1 + 2 [0 in S] + 3 [1, 2 in S] + 6 [0, 1, 2 in S]. Each term is split evenly among the
    players it needs: Shapley values 2 + 2, 1.5 + 2, 1.5 + 2 and 0 for player 3 (a dummy). The
    3-player term tells Shapley from Banzhaf (which would give it 6/4 each)."""
    c = np.asarray(coalitions)
    return 1.0 + 2.0 * c[:, 0] + 3.0 * (c[:, 1] & c[:, 2]) + 6.0 * (c[:, 0] & c[:, 1] & c[:, 2])


def test_shapley_values_of_a_game_known_by_hand():
    expected = [4.0, 3.5, 3.5, 0.0]
    values, f_all, f_none = shapley.shapley_exact(known_game, 4)
    np.testing.assert_allclose(values, expected, atol=1e-12)
    assert (f_all, f_none) == (12.0, 1.0)
    every_order = np.array(list(itertools.permutations(range(4))))
    np.testing.assert_allclose(shapley.shapley_sampled(known_game, every_order)[0], expected,
                               atol=1e-12)
    # a few random orders: not the exact values, but efficient and null for the dummy all the same
    orders = shapley.antithetic_permutations(4, 2, np.random.default_rng(3))
    values, f_all, f_none = shapley.shapley_sampled(known_game, orders)
    assert values.sum() == pytest.approx(f_all - f_none, abs=1e-12)
    assert values[3] == 0.0


def test_antithetic_orders_are_permutations_paired_with_their_reverse():
    orders = shapley.antithetic_permutations(7, 10, np.random.default_rng(0))
    assert orders.shape == (10, 7)
    assert all(sorted(row) == list(range(7)) for row in orders)
    np.testing.assert_array_equal(orders[1::2], orders[0::2, ::-1])
    np.testing.assert_array_equal(
        orders, shapley.antithetic_permutations(7, 10, np.random.default_rng(0)))
    assert not np.array_equal(
        orders, shapley.antithetic_permutations(7, 10, np.random.default_rng(1)))
    for odd in (1, 3, 0):
        with pytest.raises(common.UserError, match="--shap-samples"):
            shapley.check_shap_samples(odd)


def test_contrast_explains_the_two_predictions_or_the_runner_up():
    assert explain.contrast_classes(np.array([[.1, .1, .7, .1], [.1, .1, .3, .5]])) == (2, 3)
    assert explain.contrast_classes(np.array([[.1, .1, .7, .1], [.3, .1, .4, .2]])) == (2, 0)


# --------------------------------------------------------------------------------------------------
# On tiny models
# --------------------------------------------------------------------------------------------------
def test_efficiency_exact_and_sampled(tokenizer, one_cpu_thread):
    model = tiny_bert("attnpool")
    for text, method in ((SIX_WORDS, "exact"), (FOURTEEN_WORDS, "sampled")):
        result = shapley.word_shapley(model, tokenizer, text, 64, samples=16, seed=0)
        assert len(result.words) == (6 if method == "exact" else 14)
        assert method in result.method
        assert result.values.sum() == pytest.approx(result.f_text - result.f_empty, abs=1e-5)
        assert abs(result.f_text - result.f_empty) > 0.05  # a difference to share out, not 0 = 0
        ids = ids_of(tokenizer, text)[None]
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids, dtype=torch.bool))[0]
        assert result.predicted == int(logits.argmax())
        # f = the predicted logit
        assert result.f_text == pytest.approx(float(logits.max()), abs=1e-5)


def test_a_model_is_left_in_the_mode_it_came_in_and_an_odd_sample_count_is_refused(tokenizer):
    model = tiny_bert("pooler").train()
    shapley.word_shapley(model, tokenizer, SIX_WORDS, 64)
    assert model.training
    for samples in (0, 1, 15):
        with pytest.raises(common.UserError, match="even number of at least 2"):
            shapley.word_shapley(model, tokenizer, FOURTEEN_WORDS, 64, samples=samples)


def test_every_order_drawn_equals_exact_enumeration(tokenizer, one_cpu_thread):
    model = tiny_bert("textcnn", seed=1)
    text = "oracle software profit rise"                                # 4 words: all 24 orders
    exact = shapley.word_shapley(model, tokenizer, text, 64)
    every_order = np.array(list(itertools.permutations(range(4))))
    sampled = shapley.word_shapley(model, tokenizer, text, 64, permutations=every_order)
    assert "exact" in exact.method and "24 sampled orders" in sampled.method
    assert np.abs(exact.values).max() > 0.01
    np.testing.assert_allclose(sampled.values, exact.values, atol=1e-6)


def test_a_word_the_model_cannot_see_gets_zero(tokenizer, one_cpu_thread):
    """The dummy: a BERT with no layers, so tokens never mix, and the attnpool head, whose penalty
    of 1e4 on the id of "the" makes that token's pooling weight exp(-1e4) = 0.0 exactly in float32.
    With "the" present or absent every other number is the same, so f(S + the) = f(S) for every
    S."""
    table = torch.zeros(len(VOCAB), dtype=torch.bool)
    table[VOCAB.index("the")] = True
    text = "oracle the software profit"
    for penalty in (1e4, 0.0):
        model = tiny_bert("attnpool", layers=0, penalty_table=table, penalty=penalty)
        exact = shapley.word_shapley(model, tokenizer, text, 64)
        orders = shapley.antithetic_permutations(4, 8, np.random.default_rng(0))
        sampled = shapley.word_shapley(model, tokenizer, text, 64, permutations=orders)
        assert exact.words[1] == "the"
        if penalty:
            assert exact.values[1] == pytest.approx(0.0, abs=1e-12)
            assert sampled.values[1] == pytest.approx(0.0, abs=1e-12)
            assert np.abs(exact.values).max() > 0.01                    # the other words do count
        else:  # the same model seeing "the": the test above could fail
            assert abs(exact.values[1]) > 1e-3


def random_coalitions(n, k, seed):
    coalitions = np.random.default_rng(seed).random((k, n)) < 0.5
    coalitions[0] = True                                               # and the whole text
    return coalitions


MODELS = [*[f"bert_{head}" for head in classifiers.HEAD_NAMES], "lstm", "bilstm_attn"]


def build(name):
    return tiny_bert(name.removeprefix("bert_")) if name.startswith("bert_") else tiny_lstm(name)


@pytest.mark.parametrize("name", MODELS)
def test_absent_words_are_unseen(tokenizer, name, one_cpu_thread):
    """Whatever the ids at an absent word's positions, the value is the same: the word is not seen.
    Each coalition alone (other ids there) against all of them in one batch (the ids of the
    text)."""
    model = build(name)
    ids = ids_of(tokenizer, FOURTEEN_WORDS)
    words, word_of = shapley.group_words([tokenizer.id_to_token(int(i)) for i in ids])
    weights = np.eye(4)[2]
    coalitions = random_coalitions(len(words), 10, seed=0)
    batched = shapley.WordGame(model, ids, word_of, weights)(coalitions)
    rng = torch.Generator().manual_seed(0)
    for coalition, value in zip(coalitions, batched):
        absent = torch.from_numpy((word_of >= 0) & ~coalition[word_of.clip(0)])
        other_ids = torch.where(absent, torch.randint(5, len(VOCAB), ids.shape, generator=rng), ids)
        alone = shapley.WordGame(model, other_ids, word_of, weights)(coalition[None])[0]
        assert alone == pytest.approx(value, abs=1e-5)
    with torch.no_grad():
        full = model(ids[None], torch.ones_like(ids[None], dtype=torch.bool))[0, 2]
    assert batched[0] == pytest.approx(float(full), abs=1e-5)  # all words: the model as it is


def test_packing_reads_a_mask_with_holes_wrong(tokenizer):
    """Why the lstm head needs front_align: handed the mask with holes itself, it reads the first
    mask.sum() steps, absent tokens among them, so the value depends on the absent ids."""
    model = tiny_bert("lstm")
    ids = ids_of(tokenizer, FOURTEEN_WORDS)[None]
    present = torch.ones_like(ids, dtype=torch.bool)
    present[0, 2:6] = False
    other_ids = ids.clone()
    other_ids[0, 2:6] = VOCAB.index("bank")
    with torch.no_grad():
        naive = model(ids, present), model(other_ids, present)
    assert not torch.allclose(*naive, atol=1e-3)
    np.testing.assert_allclose(shapley.coalition_logits(model, ids, present),
                               shapley.coalition_logits(model, other_ids, present), atol=1e-6)


@pytest.mark.parametrize("arch", train_lstm.ARCHS)
def test_an_lstm_sees_the_present_words_alone(arch):
    """train_lstm.py models: the value of a coalition is the model run on the present words alone,
    in order; with none, the features are the recurrence's initial state (zeros): logits = bias."""
    model = tiny_lstm(arch, seed=2)
    ids = torch.tensor([6, 7, 8, 9, 10, 11])  # a word vocabulary: no specials
    coalitions = np.array([[1, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 0], [1] * 6, [0] * 6], dtype=bool)
    values = shapley.WordGame(model, ids, np.arange(6), np.eye(4)[1])(coalitions)
    with torch.no_grad():
        for coalition, value in zip(coalitions[:3], values):
            alone = ids[torch.from_numpy(coalition)][None]
            expected = model(alone, torch.ones_like(alone, dtype=torch.bool))[0, 1]
            assert value == pytest.approx(float(expected), abs=1e-5)
    assert values[3] == pytest.approx(model.classifier.bias[1].item(), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The flags, end to end on a tiny trained run
# --------------------------------------------------------------------------------------------------
def png_size(path):
    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


@needs_rows
def test_shap_and_contrast_flags_end_to_end(tiny_lstm_run, tmp_path, capsys, one_cpu_thread):
    short = "Oracle profit rises on strong software sales"
    long = ("Oracle says quarterly profit rose as sales of its database software grew in Europe "
            "and Asia")
    analyze.main(["--run", str(tiny_lstm_run), "--out", str(tmp_path), "--shap", "--text", short,
                  "--text", long, "--shap-samples", "8", "--steps", "16"])
    printed = capsys.readouterr().out
    assert "exact over all 2^" in printed and "8 sampled orders" in printed
    assert printed.count("Spearman rank agreement of SHAP and IG") == 2
    for f_text, f_empty, difference, total in re.findall(
            r"SHAP: f\(text\) (\S+) - f\(no words\) (\S+) = (\S+); sum of the values (\S+)",
            printed):
        assert float(total) == pytest.approx(float(f_text) - float(f_empty), abs=2e-4)
    for name in ("shap_01.png", "shap_02.png"):
        assert png_size(tmp_path / name)[0] == common.WIDE * common.DPI

    analyze.main(["--run", str(tiny_lstm_run), "--out", str(tmp_path), "--shap", "--top", "1",
                  "--shap-samples", "4", "--steps", "8"])             # no --text: the top error
    assert "test row" in capsys.readouterr().out

    other = "Sony launches a new PlayStation game console with faster chips and online play"
    analyze.main(["--run", str(tiny_lstm_run), "--out", str(tmp_path), "--contrast", long, other,
                  "--shap-samples", "4", "--sample", "100"])
    printed = capsys.readouterr().out
    assert "cosine similarity of the sentence vectors" in printed
    assert png_size(tmp_path / "contrast.png") == tuple(round(s * common.DPI)
                                                        for s in explain.CONTRAST_SIZE)


@needs_rows
def test_contrast_places_a_test_row_on_its_own_map_point(tiny_lstm_run, tmp_path, one_cpu_thread):
    # Two texts that are rows of the map's sample must land on those rows' points: the stars are
    # scored the way the map's rows are (the run's precision, bf16 on this CPU), not in fp32.
    run = analyze.SavedRun(tiny_lstm_run)
    rows, points, _ = explain.fit_map_pca(run, 100, 0)
    texts = [run.test.texts[rows[0]], run.test.texts[rows[-1]]]
    *_, placed = explain.show_contrast(run, tmp_path, texts, samples=2, sample=100, seed=0)
    # 1e-4: room for a bf16 GEMM blocked otherwise in another batch shape; fp32 placement missed
    # by 7e-4
    assert placed == pytest.approx(points[[0, -1]], abs=1e-4)
