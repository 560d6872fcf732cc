"""Data-preparation filters on small fixtures: proofs, multiple-choice leftovers, unverifiable answers, question
normalisation, near duplicates (exact by prefix filtering) and n-gram decontamination."""

import itertools
import random

import pytest

from torl.prepare.checks import multiple_choice, proof_style, unverifiable
from torl.prepare.similarity import NgramIndex, jaccard, near_duplicates
from torl.prepare.text import content_id, ngrams, question_key, words


@pytest.mark.parametrize(
    "question, answer",
    [
        ("Prove that there are infinitely many primes.", "Proof"),
        ("Let $n>1$. Show that $n^5-n$ is divisible by 30.", "30"),
        ("(a) Find the sum. (b) Prove that it is unique.", "4"),
        ("Demonstrate that the triangle is isosceles.", "\\text{isosceles}"),
        ("Find all $x$ with $x^2=4$; prove or disprove that they are integers.", "\\pm 2"),
        ("Solve the equation.", "\\blacksquare"),
        ("Solve the equation.", "QED"),
    ],
)
def test_proof_style_problems_are_caught(question, answer):
    assert proof_style(question, answer)


@pytest.mark.parametrize(
    "question, answer",
    [
        ("In what year will the census show that the number of wrens is below 10%?", "2009"),  # asks for a value
        ("Compute $\\binom{8}{4}$.", "70"),
        ("Show your work: how many divisors does 12 have?", "6"),
        ("Verify your answer by substitution. Solve $2x=6$.", "3"),
    ],
)
def test_problems_with_a_final_answer_are_not_proofs(question, answer):
    assert proof_style(question, answer) is None


@pytest.mark.parametrize(
    "question, answer, why",
    [
        (
            "Which is largest?\n$\\textbf{(A)}\\ 6\\qquad \\textbf{(B)}\\ 7\\qquad \\textbf{(C)}\\ 8$",
            "7",
            "options A-C",
        ),
        ("Which is prime?\n(A) 4 (B) 6 (C) 7 (D) 8 (E) 9", "\\text{(C)}", "options A-E"),
        ("Which rounds to 65.14?\nA) 65.141\nB) 65.138\nC) 65.1339999\n", "C", "options A-C"),
        ("Enter the letter of the graph of $y = f(|x|)$.", "\\text{B}", "letter (B)"),
        ("Which statements hold? Enter the letters separated by commas.", "\\text{A, C}", "letter (A, C)"),
    ],
)
def test_multiple_choice_leftovers_are_caught(question, answer, why):
    assert why in multiple_choice(question, answer)


@pytest.mark.parametrize(
    "question, answer",
    [
        ("Find $P(A) + P(B) + P(C)$ for the three events.", "1"),  # probabilities, not options
        ("Part (a) asks for x, part (b) for y.", "(1,2)"),  # lower-case parts
        ("dot(A); dot(B); dot(C); label the points. Find AB.", "5"),  # Asymptote code
        ("Which vertex is closest to the origin?", "AB"),
    ],
)
def test_ordinary_problems_are_not_multiple_choice(question, answer):
    assert multiple_choice(question, answer) is None


@pytest.mark.parametrize(
    "answer, why",
    [
        ("\\frac{1}{2", "unbalanced"),
        ("x}", "unbalanced"),
        ("It is not possible to do so", "a sentence"),
        ("\\", "math-verify"),
        ("$", "math-verify"),
        ("...", "math-verify"),
    ],
)
def test_unverifiable_answers_are_caught(answer, why):
    assert why in unverifiable(answer)


@pytest.mark.parametrize(
    "answer", ["025", "\\frac{3}{4}", "(1,2]", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\text{east}", "12\\pi"]
)
def test_gradable_answers_pass(answer):
    assert unverifiable(answer) is None


def test_question_key_ignores_formatting_only():
    a = "Find $\\dfrac{1}{2}$ of   10."
    assert question_key(a) == question_key("find \\frac{1}{2} of 10")
    assert question_key("Find $\\left(\\frac{1}{2}\\right)$ of 10") == question_key("Find (\\frac{1}{2}) of 10")
    assert question_key("Find 1/2 of 10") != question_key("Find 1/3 of 10")
    assert content_id(question_key(a)) == content_id(question_key("FIND \\frac{1}{2} OF 10."))
    assert len(content_id("x")) == 16


def test_words_and_ngrams():
    assert words("Let $x^2 = 25$; find \\left(x\\right).") == ["let", "x", "2", "25", "find", "x"]
    assert ngrams(["a", "b", "c", "d"], 3) == {"a b c", "b c d"}
    assert ngrams(["a", "b"], 3) == {"a b"}  # shorter than n: one gram of everything
    assert ngrams([], 3) == frozenset()


def test_near_duplicates_keeps_the_first_and_needs_agreeing_answers():
    texts = [
        "the quick brown fox jumps over the lazy dog today",
        "something else entirely about triangles and circles",
        "the quick brown fox jumps over the lazy dog today!",  # same words as 0
        "the quick brown fox jumps over the lazy cat today",  # a variant
    ]
    sets = [ngrams(words(t), 2) for t in texts]
    found = near_duplicates(sets, 0.9)
    assert found == {2: (0, 1.0)}
    looser = near_duplicates(sets, 0.6)
    assert set(looser) == {2, 3} and looser[3][0] == 0
    vetoed = near_duplicates(sets, 0.6, accept=lambda i, j: i != 3)  # 3 has another answer: a different problem
    assert set(vetoed) == {2}


def test_near_duplicates_finds_every_pair_brute_force_finds():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(12)]
    sets = [frozenset(rng.sample(vocab, rng.randint(3, 8))) for _ in range(120)]
    for threshold in (0.5, 0.7, 0.9):
        found = near_duplicates(sets, threshold)
        kept: list[int] = []
        for i, s in enumerate(sets):  # the greedy definition, pair by pair
            sims = [(jaccard(s, sets[j]), j) for j in kept]
            best = max(sims, default=(0.0, -1))
            if best[0] >= threshold:
                assert i in found and found[i][1] == pytest.approx(best[0])
            else:
                assert i not in found
                kept.append(i)


def test_ngram_index_overlap_over_the_shorter_question():
    index = NgramIndex(3)
    index.add("bench", "b/1", "Find the number of ordered pairs of positive integers whose product is 2024.")
    index.add("bench", "b/2", "A circle has radius 5. What is its area?")
    hits = index.overlaps("How many ordered pairs of positive integers have product 2024?", 0.3)
    assert [h.problem_id for h in hits] == ["b/1"] and hits[0].score < 1.0
    exact = index.overlaps("A circle has radius 5.  What is its AREA?", 0.99)
    assert [(h.problem_id, h.score) for h in exact] == [("b/2", 1.0)]
    contained = index.overlaps("A circle has radius 5.", 0.99)  # a short question inside a long one
    assert [h.problem_id for h in contained] == ["b/2"]
    assert index.overlaps("Completely unrelated question about dice and coins.", 0.1) == []


def test_similarity_inputs_are_checked():
    with pytest.raises(ValueError):
        near_duplicates([frozenset("a")], 0.0)
    with pytest.raises(ValueError):
        NgramIndex(0)
    assert list(itertools.islice(near_duplicates([frozenset(), frozenset()], 0.5).items(), 1)) == []
