"""The grader as a real Ray actor: batch grading, pathological answers, and threaded execution (max_concurrency)."""

import time

from torl.config import RewardConfig


def test_grader_actor_grades_batches_and_survives_pathological_answers(ray_cluster):
    ray = ray_cluster
    from actors.grader import GraderActor

    # max_concurrency > 1 runs methods on worker threads, where math-verify's own signal.alarm timeout would fail.
    grader = GraderActor.options(max_concurrency=4).remote(RewardConfig(grade_timeout_s=3.0, exec_error_penalty=0.5))
    try:
        items = [
            ("so the answer is \\boxed{025}", "25", False, False),
            ("\\boxed{\\frac{1}{2(n+1)}}", "$\\frac{1}{2 n+2}$", True, False),
            ("\\boxed{7 - 5i}", "6 - 5i", True, True),  # wrong, and its code failed: penalised
            ("no box", "3", False, False),
            ("\\boxed{9^{9^{9^{9}}}}", "5", False, False),  # hangs math-verify: must time out as wrong
            ("\\boxed{" + "x+" * 5000 + "1}", "5", False, False),  # absurdly long: wrong without parsing
            (None, "5", False, False),  # malformed items are scored wrong, never raised
            ("\\boxed{84, 69}", "$69$,$84$", True, False),
        ]
        expected = [
            (1.0, True),
            (1.0, True),
            (-1.5, False),
            (-1.0, False),
            (-1.0, False),
            (-1.0, False),
            (-1.0, False),
            (1.0, True),
        ]
        t0 = time.monotonic()
        # Two batches at once exercise concurrent calls into the helper from different threads.
        first, second = ray.get([grader.grade.remote(items), grader.grade.remote(items[:2])], timeout=120)
        assert first == expected
        assert second == expected[:2]
        assert time.monotonic() - t0 < 60
        stats = ray.get(grader.stats.remote())
        assert stats["grader/items"] == len(items) + 2
        assert stats["grader/timeouts"] >= 1
        bad = ray.get(grader.grade.remote([("\\boxed{1}",)]))  # wrong arity
        assert bad == [(-1.0, False)]
        ray.get(grader.shutdown.remote())
    finally:
        ray.kill(grader)
