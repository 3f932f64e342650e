#!/usr/bin/env python3
"""Writes bench/distill/prompts.jsonl: the self-distillation prompt set for training speculators
(Medusa heads, MTP modules, draft models). Deterministic (seeded) combinations of subjects and
request forms in four groups: chat, code, explanation, rewriting. None of them is a prompt of
bench/tasks/ (the evaluation set); the script checks that."""
import json, random, pathlib

random.seed(20261129)
root = pathlib.Path(__file__).resolve().parent.parent

chat_subjects = ["learning a new language", "keeping houseplants alive", "planning a birthday party", "saving money on groceries",
    "starting to run", "sleeping better", "making friends in a new city", "preparing for a job interview", "organising a small kitchen",
    "choosing a first guitar", "reading more books", "cooking for one person", "travelling with a cat", "writing a thank-you note",
    "learning to swim as an adult", "staying motivated at work", "planning a garden", "buying a used bike", "hosting a board game night",
    "taking better photos with a phone", "reducing screen time", "training for a 5k", "moving to a new apartment", "learning to draw",
    "decluttering a closet", "choosing a laptop for school", "making coffee at home", "camping for the first time", "volunteering locally",
    "keeping a journal"]
chat_forms = ["Can you give me some advice about {}?", "What are the most common mistakes people make when {}?", "I need tips for {}. Where should I start?",
    "Write a short friendly message to a friend who is nervous about {}.", "Give me a simple step-by-step plan for {}."]
code_tasks = ["reverses the words in a sentence", "counts how often each word appears in a text", "checks whether a number is prime",
    "merges two sorted lists into one sorted list", "finds the largest element in a list without using max", "converts Celsius to Fahrenheit",
    "removes all vowels from a string", "computes the factorial of a number recursively", "flattens a nested list", "returns the second smallest number in a list",
    "validates an email address with a simple rule", "groups a list of words by their first letter", "computes the average of a list of numbers",
    "checks whether two strings are anagrams", "generates the first n prime numbers", "rotates a list by k positions", "finds duplicate values in a list",
    "converts a binary string to an integer", "counts the vowels in a string", "transposes a matrix given as a list of lists",
    "capitalises the first letter of every word", "implements binary search on a sorted list", "returns the running total of a list",
    "parses a date string in YYYY-MM-DD format", "computes the greatest common divisor of two numbers"]
languages = ["Python", "JavaScript", "Rust", "Go", "Java", "C"]
explain_topics = ["photosynthesis", "how vaccines work", "inflation", "the water cycle", "how a refrigerator keeps food cold", "compound interest",
    "what DNA does", "how airplanes stay in the air", "supply and demand", "why the moon has phases", "how the internet sends data", "what a neural network is",
    "how rainbows form", "the greenhouse effect", "how batteries store energy", "what an API is", "how tides work", "the difference between weather and climate",
    "how recycling works", "what a database index is", "why leaves change colour in autumn", "how a compiler works", "what gravity is",
    "how earthquakes happen", "what version control is"]
audiences = ["a ten-year-old", "a busy adult in two sentences", "a high school student", "someone who has never studied science"]
rewrite_texts = [
    "The meeting has been moved to Thursday because several people could not attend on Monday. Please update your calendars.",
    "Our new café opens next week. We serve fresh bread every morning and the coffee is roasted locally.",
    "I am writing to complain about the late delivery of my order. It arrived two weeks after the promised date.",
    "The library will close early on Friday for staff training. Books can still be returned through the drop box.",
    "Thanks for helping me move last weekend. I could not have done it without you and the pizza was on me.",
    "The software update fixes several bugs, improves battery life and adds a dark mode to the settings menu.",
    "Due to heavy rain, the football match is postponed. A new date will be announced soon.",
    "Please remember to water the plants and feed the cat while I am away for the holidays.",
    "Our team finished the project ahead of schedule, and the client was very happy with the results.",
    "The museum offers free entry on the first Sunday of every month, but booking a ticket online is required.",
    "We are looking for volunteers to help clean up the park on Saturday morning. Gloves and bags will be provided.",
    "The train was delayed by forty minutes, so I missed the start of the concert.",
]
rewrite_forms = ["Rewrite this text in a more formal tone:\n\n{}", "Make this text shorter while keeping its meaning:\n\n{}",
    "Rewrite this text so it sounds friendlier:\n\n{}", "Turn this text into a bulleted list of the key points:\n\n{}",
    "Fix the style of this text and make it clearer:\n\n{}", "Summarise this text in one sentence:\n\n{}"]

rows = []
for s in chat_subjects:
    for f in random.sample(chat_forms, 4):
        rows.append(("chat", f.format(s)))
for t in code_tasks:
    for lang in random.sample(languages, 3):
        rows.append(("code", f"Write a {lang} function that {t}."))
for t in explain_topics:
    for a in random.sample(audiences, 3):
        rows.append(("explanation", f"Explain {t} to {a}."))
for t in rewrite_texts:
    for f in random.sample(rewrite_forms, 4):
        rows.append(("rewriting", f.format(t)))
random.shuffle(rows)

held_out = set()
for f in (root / "bench" / "tasks").glob("*.jsonl"):
    for line in f.read_text().splitlines():
        if line.strip():
            held_out.add(json.loads(line)["messages"][-1]["content"])
assert not held_out & {p for _, p in rows}, "a benchmark prompt leaked into the training set"

out = root / "bench" / "distill" / "prompts.jsonl"
out.parent.mkdir(parents=True, exist_ok=True)
with out.open("w") as f:
    for group, p in rows:
        f.write(json.dumps({"group": group, "messages": [{"role": "user", "content": p}]}) + "\n")
print(f"{len(rows)} prompts -> {out}")
