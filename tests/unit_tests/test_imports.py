import langchain_braid


def test_all_and_version() -> None:
    assert sorted(langchain_braid.__all__) == sorted(
        ["ChatBraid", "TOKEN_IDS_KEY", "ToolChoiceError", "ToolSchemaError",
         "UnsupportedContentError", "__version__"])
    assert langchain_braid.__version__ == "0.1.0"
