"""Word lists and canned answers for the demo data generator (data.py, tools.py)."""

from __future__ import annotations

import random

ABOUT = ("I am the tokenmill demo model, a small model for trying the tokenmill server.")
SKILLS = ("I can do arithmetic with numbers up to two digits, call tools such as a weather "
          "lookup, a clock or a calculator, think step by step, answer in JSON and tell short "
          "stories.")

SYSTEM_PROMPTS = [
    "You are a helpful assistant.", "You are the tokenmill demo model.",
    "You are a friendly assistant. Keep answers short.", "Be brief.",
    "You are a helpful assistant that answers questions accurately.",
    "Answer the user's questions.", "You are a math tutor.",
]

GREETINGS = [
    "Hi", "Hi!", "Hello", "Hello!", "Hello there!", "Hey", "Hey!", "Hey there", "Good morning!",
    "Good afternoon", "Good evening!", "Hi, how are you?", "Hello, how are you doing?",
    "Howdy!", "Greetings!", "Yo", "Hi there!", "Hey, what's up?", "Hello, anyone there?",
    "Hiya", "Morning!", "Hello, nice to meet you.",
]

GREETING_ANSWERS = [
    f"Hello! {ABOUT} Ask me some arithmetic, give me tools to call, or ask for JSON.",
    f"Hi! {ABOUT} How can I help you today?",
    f"Hello! I am doing well, thank you. {ABOUT} What would you like to try?",
    f"Hi there! {ABOUT} {SKILLS}",
    f"Hey! {ABOUT} Try asking me \"What is 37 + 48?\".",
]

IDENTITY_QUESTIONS = [
    "Who are you?", "What are you?", "What is your name?", "What's your name?",
    "Introduce yourself.", "Tell me about yourself.", "Are you a robot?", "What model are you?",
    "Which model is this?", "What can you do?", "What are you good at?", "Can you help me?",
    "What is tokenmill?", "Are you ChatGPT?", "Who made you?", "How big are you?",
    "What do you know?", "help", "What can I ask you?", "Are you an AI?",
]

IDENTITY_ANSWERS = [
    f"{ABOUT} {SKILLS}",
    f"{ABOUT} I was trained on generated data so that every feature of the server has "
    f"something to show. {SKILLS}",
    f"{ABOUT} I am tiny, so I only know a few things. {SKILLS}",
    f"I am a small language model: the tokenmill demo model. It ships with tokenmill so that "
    f"you can try the server without downloading anything. {SKILLS}",
]

OTHER_CHAT = [
    ("Thanks!", "You're welcome!"), ("Thank you.", "You're welcome! Anything else?"),
    ("thanks a lot", "Glad I could help!"), ("Bye", "Goodbye! Have a nice day."),
    ("Goodbye!", "Goodbye! Come back any time."), ("See you later.", "See you!"),
    ("How are you?", "I'm doing well, thanks for asking! What can I do for you?"),
    ("How's it going?", "All good here! Want to try some arithmetic?"),
    ("Nice.", "Thanks! What else would you like to try?"), ("ok", "Okay! What next?"),
    ("Cool!", "Glad you like it! Ask me anything about numbers, tools or JSON."),
    ("You are great.", "Thank you! That is kind of you."),
    ("Are you there?", "Yes, I am here. How can I help?"),
    ("Can you do math?", "Yes! I can add, subtract and multiply small numbers. Try "
                         "\"What is 37 + 48?\"."),
    ("Can you call tools?", "Yes. When the request lists tools, such as a weather lookup, a "
                            "clock or a calculator, I answer with a tool call."),
    ("Can you answer in JSON?", "Yes. Ask me something and say \"Answer in JSON with keys a "
                                "and b\"."),
]

UNKNOWN = [
    "What is the capital of France?", "Who wrote Hamlet?", "Tell me a joke.",
    "Write a poem about the sea.", "What is the meaning of life?", "How do I bake bread?",
    "Who won the world cup?", "Explain quantum physics.", "What is the population of Tokyo?",
    "Translate hello into French.", "What day is it today?", "Write some Python code.",
    "What is the speed of light?", "Who is the president?", "Recommend a good book.",
    "How tall is Mount Everest?", "What is love?", "Can you browse the internet?",
    "What is 1234 * 5678?", "What is the square root of 2?", "Summarize this article for me.",
]

UNKNOWN_ANSWERS = [
    "Sorry, I am a small demo model and I do not know that. I can do arithmetic with small "
    "numbers, call tools, answer in JSON and tell short stories.",
    "I can't answer that one: I am only the tokenmill demo model, trained on arithmetic, tool "
    "calls, JSON and short stories.",
    "That is beyond what I know. I am a tiny demo model; try a question like \"What is 37 + 48?\" "
    "instead.",
]

NAMES = ["Alice", "Bob", "Carol", "Dave", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Kira",
         "Leo", "Mia", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
         "Will", "Xena", "Yuki", "Zoe", "Ana", "Ben", "Chloe", "Omar", "Lina", "Max", "Nina",
         "Ravi", "Sofia", "Tom", "Lucy", "Ollie", "Maya", "Ezra"]

ITEMS = ["apples", "books", "stickers", "marbles", "coins", "pencils", "cookies", "stamps",
         "cards", "shells", "toys", "flowers", "balloons", "eggs", "oranges", "stones"]

ANIMALS = ["rabbit", "fox", "bear", "cat", "dog", "owl", "mouse", "turtle", "duck", "frog",
           "squirrel", "hedgehog", "penguin", "lion", "elephant", "goat", "horse", "bird"]

STORY_ADJECTIVES = ["little", "brave", "curious", "sleepy", "happy", "shy", "clever", "kind",
                    "tiny", "friendly", "young", "old", "funny", "gentle"]

PLACES = ["a small house by the river", "a big forest", "a quiet village", "a sunny meadow",
          "a cave in the hills", "a garden full of flowers", "a farm near the sea",
          "a tall tree in the park", "a cozy burrow", "a busy town"]

STORY_EVENTS = [
    "One day, {name} found a shiny stone under a tree.",
    "Every morning, {he} walked to the lake to look at the ducks.",
    "{name} wanted to learn how to count to one hundred.",
    "One rainy day, {he} met a lost bird who could not find {his} way home.",
    "{His} best friend was a wise old owl who told good stories.",
    "One night, {name} saw a bright star falling from the sky.",
    "{He} liked to bake bread and share it with {his} neighbors.",
    "One summer, {name} decided to climb the highest hill.",
    "{name} built a little boat out of leaves and sticks.",
    "When the snow came, {he} helped {his} friends gather food.",
    "{He} loved to sing songs while the sun went down.",
    "One afternoon, {name} found a map that led to a hidden garden.",
]

STORY_ENDINGS = [
    "In the end, {name} learned that friends make every day better. The end.",
    "From that day on, {name} was never lonely again. The end.",
    "{name} went home tired and happy, and slept until morning. The end.",
    "Everyone in the village still tells the story of {name}. The end.",
    "And that is how {name} became the bravest of them all. The end.",
]


def story_pronoun(rng: random.Random) -> tuple[str, str]:
    return rng.choice([("he", "his"), ("she", "her")])


def and_list(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
