"""A RAG app whose questions share one system prompt and one retrieved context.

An LCEL chain `retriever | prompt | ChatBraid | parser` answers many questions with
`batch()`. Every prompt starts with the same system text and the same retrieved passages, so
after the first question the engine reuses that prefix's KV: watch `cache_read`.

The retriever is LangChain's `InMemoryVectorStore` over a local embedding model when one is
given (`--embedding-model DIR`, any Hugging Face encoder, e.g. all-MiniLM-L6-v2), BM25 otherwise.

    python examples/rag_app.py --model tiny              # offline, tiny random model (words are noise)
    python examples/rag_app.py --model Qwen/Qwen3-0.6B --embedding-model ./all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from collections import Counter
from operator import itemgetter

import torch
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableParallel
from langchain_core.vectorstores import InMemoryVectorStore

from braid_engine import BraidError, ModelNotFoundError
from braid_engine.testing import make_tiny_checkpoint
from langchain_braid import ChatBraid

PASSAGES = [
    "The Aurora line opened in 2019 and runs from Harbour Station to Northgate every 6 minutes.",
    "Tickets for the Aurora line cost 2.40 euros; a day pass costs 7 euros and covers all lines.",
    "Harbour Station has lifts on every platform; Northgate has step-free access since 2023.",
    "Night services run on Fridays and Saturdays until 2 a.m., every 20 minutes.",
    "Bicycles ride free outside the rush hours of 7 to 9 a.m. and 4 to 7 p.m.",
    "Lost property is kept at Harbour Station for 30 days and can be claimed with an ID.",
    "The Meadow line connects Northgate to the airport in 18 minutes.",
    "Children under 12 travel free with an adult holding a valid ticket.",
]
QUESTIONS = [
    "How often does the Aurora line run?", "How much is a day pass?",
    "Is Northgate step-free?", "Until when do night services run?",
    "Can I take my bicycle at 8 a.m.?", "Where is lost property kept?",
    "How long does the Meadow line take to the airport?", "Do children pay?",
]
SYSTEM = ("You are the help desk of a city transit company. Answer in one sentence, using only "
          "the context. If the context does not say, answer that you do not know.")


class LocalEmbeddings(Embeddings):
    """Mean-pooled, normalised hidden states of a local Hugging Face encoder."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class ModelTimer(BaseCallbackHandler):
    """Seconds from the model call's start to its end (one timer per question)."""

    def on_chat_model_start(self, *args, **kwargs) -> None:
        self.start = time.perf_counter()

    def on_llm_end(self, *args, **kwargs) -> None:
        self.seconds = time.perf_counter() - self.start


class BM25Retriever(BaseRetriever):
    """Okapi BM25 over a fixed list of documents (used when no embedding model is installed)."""

    docs: list[Document]
    k: int = 4

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun
                                ) -> list[Document]:
        def words(text: str) -> list[str]:
            return re.findall(r"\w+", text.lower())

        corpus = [words(d.page_content) for d in self.docs]
        avg = sum(map(len, corpus)) / len(corpus)
        df = Counter(w for doc in corpus for w in set(doc))
        n = len(corpus)

        def score(doc: list[str]) -> float:
            tf = Counter(doc)
            return sum(math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5)) * tf[w] * 2.2
                       / (tf[w] + 1.2 * (0.25 + 0.75 * len(doc) / avg)) for w in words(query) if w in tf)

        ranked = sorted(range(n), key=lambda i: -score(corpus[i]))
        return [self.docs[i] for i in sorted(ranked[: self.k])]  # corpus order: a stable prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny', a local directory or a hub id")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--embedding-model", default=None,
                    help="a local Hugging Face encoder directory ('tiny': the tiny model's own layers)")
    args = ap.parse_args()
    model = args.model
    if model == "tiny":
        scratch = tempfile.TemporaryDirectory(prefix="braid-tiny-")  # removed when main returns
        model = str(make_tiny_checkpoint(scratch.name, arch="qwen3"))
    chat = ChatBraid(model=model, device=args.device, temperature=0, max_tokens=args.max_tokens,
                     enable_thinking=False)
    docs = [Document(p) for p in PASSAGES]
    if args.embedding_model:
        path = model if args.embedding_model == "tiny" else args.embedding_model
        try:
            store = InMemoryVectorStore.from_documents(docs, LocalEmbeddings(path))
        except OSError as e:  # transformers could not find or read it
            sys.exit(f"--embedding-model {args.embedding_model}: {e}")
        retriever = store.as_retriever(search_kwargs={"k": 4})
        print(f"retriever: InMemoryVectorStore over {args.embedding_model} embeddings")
    else:
        retriever = BM25Retriever(docs=docs)
        print("retriever: BM25 (pass --embedding-model DIR for vector search)")
    prompt = ChatPromptTemplate.from_messages([
        ("system", SYSTEM + "\n\nContext:\n{context}"), ("human", "{question}")])
    # the parser keeps the answer text and the usage that shows the shared prefix at work
    parser = RunnableParallel(answer=StrOutputParser(), usage=lambda m: m.usage_metadata)
    chain = ({"context": itemgetter("topic") | retriever | (lambda ds: "\n".join(d.page_content for d in ds)),
              "question": itemgetter("question")} | prompt | chat | parser)
    inputs = [{"topic": "Aurora line tickets stations access night bicycles lost property", "question": q}
              for q in QUESTIONS]
    try:
        timers = [ModelTimer() for _ in inputs]
        t0 = time.perf_counter()
        first = chain.invoke(inputs[0], config={"callbacks": [timers[0]]})  # computes the shared prefix once
        t1 = time.perf_counter()
        rest = chain.batch(inputs[1:], config=[{"callbacks": [t]} for t in timers[1:]])  # batched together
        t2 = time.perf_counter()
    except ModelNotFoundError as e:
        sys.exit(f"{e}\nNo network and no local copy? Try --model tiny (a tiny random checkpoint).")
    except BraidError as e:  # a bad option or input: the message says what to do
        sys.exit(str(e))
    results = [first, *rest]
    rows = [r["usage"] for r in results]
    print(f"{'question':<52} {'input':>6} {'cache_read':>10} {'model s':>8}  answer")
    for q, r, timer in zip(QUESTIONS, results, timers):
        u = r["usage"]
        print(f"{q:<52} {u['input_tokens']:>6} {u['input_token_details']['cache_read']:>10} "
              f"{timer.seconds:>8.2f}  {r['answer'][:60]!r}")
    total_in = sum(u["input_tokens"] for u in rows)
    total_read = sum(u["input_token_details"]["cache_read"] for u in rows)
    print(f"total: {total_in} input tokens, {total_read} read from the cache "
          f"({total_read / total_in:.0%}); first question {t1 - t0:.2f} s, "
          f"the other {len(rest)} batched {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
