import pytest
import torch

from c2f.evaluation import ranking, ranks_of_first_hit, recall_metrics


def test_recall_metrics_on_a_hand_computed_similarity_matrix():
    # 4 captions (image ids 0,0,1,2) against 3 images (ids 0,1,2).
    speech_ids, gallery_ids = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2])
    s2i = torch.tensor([
        [0.9, 0.1, 0.0],  # correct image ranked 1
        [0.2, 0.8, 0.1],  # ranked 2
        [0.3, 0.1, 0.5],  # ranked 3
        [0.0, 0.1, 0.7],  # ranked 1
    ])
    i2s = torch.tensor([
        [0.1, 0.4, 0.9, 0.3],  # image 0: its captions (cols 0,1) rank 3 and 2 -> first hit at 2
        [0.5, 0.1, 0.4, 0.0],  # image 1: caption col 2 at rank 2
        [0.1, 0.2, 0.3, 0.9],  # image 2: caption col 3 at rank 1
    ])
    metrics = recall_metrics(ranking(s2i), ranking(i2s), speech_ids, gallery_ids, ks=(1, 2, 3))
    assert metrics["s2i_R@1"] == pytest.approx(50.0) and metrics["s2i_R@2"] == pytest.approx(75.0)
    assert metrics["s2i_R@3"] == pytest.approx(100.0)
    assert metrics["s2i_mean_rank"] == pytest.approx((1 + 2 + 3 + 1) / 4)
    assert metrics["i2s_R@1"] == pytest.approx(100 / 3) and metrics["i2s_R@2"] == pytest.approx(100.0)
    assert metrics["i2s_median_rank"] == 2


def test_a_query_without_any_correct_item_is_an_error():
    with pytest.raises(ValueError, match="correct item"):
        ranks_of_first_hit(ranking(torch.rand(2, 3)), torch.tensor([[True, False, False], [False, False, False]]))


def test_local_evaluate_module_matches_the_library_function(tmp_path, monkeypatch):
    import evaluate

    from c2f.metrics import RETRIEVAL_RECALL_PATH

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path))
    metric = evaluate.load(RETRIEVAL_RECALL_PATH)
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.3, 0.1, 0.5], [0.0, 0.1, 0.7]])
    speech_ids, gallery_ids = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2])
    result = metric.compute(predictions=scores.tolist(), references=speech_ids.tolist(), gallery_image_ids=gallery_ids.tolist())
    expected = recall_metrics(ranking(scores), ranking(scores.t()), speech_ids, gallery_ids)
    assert result.keys() == expected.keys()
    assert all(result[name] == pytest.approx(expected[name]) for name in expected)
    assert result["s2i_R@1"] == pytest.approx(50.0)
