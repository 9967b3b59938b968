from gsmtune.prompt_lookup import Lookup


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_tail():
    row = Lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3])
    assert row.draft(3) == [7, 8, 2]  # (8, 2, 3) never came before; (2, 3) last did at 5
    assert row.draft(10) == [7, 8, 2, 3]
    row.extend([4])
    assert row.draft(2) == []  # 4 never came before
    assert Lookup([5, 6, 5]).draft(4) == [6, 5]  # a loop predicts itself
    assert Lookup([]).draft(3) == [] and Lookup([7]).draft(3) == []


def test_extending_token_by_token_indexes_what_one_call_does():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    grown = Lookup(tokens[:5])
    for i in range(5, len(tokens)):
        grown.extend([tokens[i]])
        whole = Lookup(tokens[:i + 1])
        assert grown.last == whole.last and grown.draft(4) == whole.draft(4)
        # the draft is what followed the latest earlier occurrence of the longest matching tail
        seen = tokens[:i + 1]
        for n in (3, 2, 1):
            starts = [s for s in range(i + 1 - n) if seen[s:s + n] == seen[-n:]]
            if starts:
                assert whole.draft(4) == seen[starts[-1] + n:starts[-1] + n + 4]
                break
        else:
            assert whole.draft(4) == []
