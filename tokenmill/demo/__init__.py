"""The embedded demo model: data, tokenizer, training and evaluation (see README.md here).

    data.py       seeded generator of chat samples (arithmetic, greetings, tools, JSON, thinking)
                  and plain-text stories
    tools.py      the tool schemas, tool-call questions and answers after a tool result
    tokenizer.py  byte-level BPE trained on generated data + the ChatML chat template
    train.py      plain-PyTorch training of a small Qwen3 model -> a Hugging Face folder
    evaluate.py   held-out questions through `tokenmill serve` with the openai SDK
"""
