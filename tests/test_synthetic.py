from tunebook.dataset.synthetic import LEANS_ON_CHUNK, contaminated, exact_duplicates, near_duplicates, normalize, parse_pairs, parse_score, supporting_sentence

QUESTIONS = [
    "How do I upgrade Debian to the next stable release?",
    "how do I upgrade Debian to the next stable release",  # exact once normalized
    "How can I upgrade Debian to the next stable release?",  # near duplicate
    "How do I install a package that is not in Debian's archive?",  # different
    "What is the difference between testing and unstable?",  # different
    "デビアンの次の安定版へはどうやってアップグレードしますか？",  # different (Japanese)
    "デビアンの次の安定版へは、どうやってアップグレードしますか。",  # near duplicate of the Japanese one
]


def test_normalize_ignores_width_case_and_punctuation():
    assert normalize("Ｄｅｂｉａｎ,  FAQ!") == normalize("debian faq") == "debian faq"


def test_exact_duplicates_keep_the_first_copy():
    assert exact_duplicates(QUESTIONS) == [1]


def test_near_duplicates_known_positives_and_negatives():
    dropped = near_duplicates(QUESTIONS, threshold=0.6)
    assert 1 in dropped and 2 in dropped and 6 in dropped  # the copies, in both scripts
    assert not {0, 3, 4, 5} & set(dropped)  # the first of each group and the different questions stay
    assert near_duplicates(QUESTIONS[3:6], threshold=0.6) == []


def test_decontamination_against_the_eval_split():
    eval_texts = ["What is the difference between the testing and unstable distributions of Debian?", "日本語のマニュアルはどこにありますか"]
    generated = [
        "Explain the difference between the testing and unstable distributions of Debian.",  # shares 8 words
        "How do I upgrade Debian to the next stable release?",  # shares none
        "日本語のマニュアルはどこで読めますか",  # shares 8 characters
        "英語の説明書はありますか",  # shares none
    ]
    assert contaminated(generated, eval_texts, n=8) == [0, 2]
    assert contaminated(generated, [], n=8) == []


# --- parsing a teacher's reply, finding the supporting sentence, the self-contained filter ---


def test_pairs_are_parsed_tolerantly():
    fenced = '```json\n{"pairs": [{"question": "What is apt?", "answer": "A package tool."}]}\n```'
    assert parse_pairs(fenced) == [{"question": "What is apt?", "answer": "A package tool."}]
    cut_off = '{"pairs": [{"question": "What is apt?", "answer": "A  package\ntool."}, {"question": "Why'
    assert parse_pairs(cut_off) == [{"question": "What is apt?", "answer": "A package tool."}]  # whitespace runs joined
    assert parse_pairs('[{"question": "Q one?", "answer": "A1", "quote": "q", "extra": 3}]', optional=("quote",)) == [
        {"question": "Q one?", "answer": "A1", "quote": "q"}
    ]
    assert parse_pairs('{"question": "Q?", "answer": "A"}') == [{"question": "Q?", "answer": "A"}]  # a bare pair
    assert parse_pairs('{"pairs": [{"question": "Q?"}, {"answer": "A"}, "text"]}') == []  # items without both fields
    assert parse_pairs("Sure! Here are some questions: what, why") is None
    assert parse_pairs("") is None


def test_judge_scores_are_read_or_none():
    assert parse_score('{"score": 4, "reason": "fine"}') == 4
    assert parse_score('```json\n{"score": "5"') == 5
    assert parse_score('{"score": 9}') is None and parse_score("no idea") is None and parse_score("") is None


CHUNK = (
    "Reef mirrors are listed in the file /etc/tide/mirrors. Tidepool tries them in order and uses the first one "
    "that answers within five seconds.\n\nA mirror that serves a bad signature is skipped for one hour."
)


def test_supporting_sentence_verbatim_misquoted_missing_and_unsupported():
    first = "Reef mirrors are listed in the file /etc/tide/mirrors."
    assert supporting_sentence(first, "In /etc/tide/mirrors.", CHUNK) == first
    assert supporting_sentence("Reef mirrors are kept in the file /etc/tide/mirrors.", "x", CHUNK) == first  # misquoted
    assert supporting_sentence(None, "skipped for one hour", CHUNK) == "A mirror that serves a bad signature is skipped for one hour."
    assert supporting_sentence("Debian has 59000 packages.", "Debian has many packages.", CHUNK) is None


def test_questions_that_lean_on_the_chunk_are_caught():
    leaning = [
        "What does the passage say about mirrors?",
        "According to the text, how long is a mirror skipped?",
        "What is described in this document?",
        "Which file does the above excerpt name?",
    ]
    standalone = [
        "Where does Tidepool list its mirrors?",
        "How long is a Reef mirror with a bad signature skipped?",
        "What text editor does Debian ship by default?",
    ]  # "text" alone is not a reference to the chunk
    assert all(LEANS_ON_CHUNK.search(q) for q in leaning)
    assert not any(LEANS_ON_CHUNK.search(q) for q in standalone)
