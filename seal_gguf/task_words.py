"""The words and templates the generated retrieval tasks are made of (seal_gguf.tasks).

Tuples, not sets: a fixed order, so the same seed gives the same cases in every process. The train
and eval splits draw from disjoint halves of these lists (seal_gguf.tasks._split_words) and from
disjoint consonants for made-up words.
"""

from __future__ import annotations

# -- vocabularies (tuples: fixed order, no hash randomisation) --
ADJECTIVES = (
    "able", "absent", "agile", "alert", "ancient", "angry", "brave", "bright", "brisk", "broad", "bumpy",
    "busy", "calm", "careful", "cheerful", "chilly", "clever", "cloudy", "clumsy", "cold", "cozy", "crisp",
    "curious", "damp", "dark", "dizzy", "dusty", "eager", "early", "electric", "elegant", "empty", "fancy",
    "fearless", "fierce", "fluffy", "foggy", "fragile", "free", "fresh", "friendly", "frozen", "funny",
    "gentle", "giant", "gifted", "glad", "golden", "graceful", "grumpy", "happy", "hasty", "heavy", "hidden",
    "hollow", "honest", "humble", "hungry", "icy", "idle", "jolly", "juicy", "keen", "kind", "lazy", "little",
    "lively", "lonely", "loud", "lucky", "mellow", "merry", "mighty", "misty", "modern", "muddy", "narrow",
    "neat", "nervous", "noble", "noisy", "odd", "old", "orange", "patient", "plain", "polite", "proud",
    "purple", "quick", "quiet", "rapid", "rare", "restless", "rich", "rough", "round", "rusty", "sandy",
    "scarlet", "shiny", "silent", "silver", "simple", "sleepy", "slow", "smooth", "snowy", "soft", "solid",
    "sour", "spicy", "steady", "stormy", "strange", "sturdy", "sunny", "sweet", "swift", "tall", "tame",
    "tender", "tiny", "tough", "velvet", "wandering", "warm", "wild", "windy", "wise", "witty", "young",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "banner", "basket", "beacon", "beetle", "bell", "bottle", "bridge",
    "bucket", "button", "cabin", "camel", "candle", "canyon", "castle", "cat", "cellar", "chair", "cherry",
    "circle", "cliff", "clock", "cloud", "comet", "compass", "coral", "cricket", "crown", "dagger", "desert",
    "dolphin", "door", "dragon", "drum", "eagle", "engine", "falcon", "feather", "fern", "fiddle", "flame",
    "forest", "fountain", "fox", "garden", "giraffe", "glacier", "goblet", "harbor", "hammer", "harp", "hawk",
    "helmet", "hill", "island", "jacket", "jungle", "kettle", "kite", "ladder", "lantern", "lemon", "lion",
    "lizard", "magnet", "maple", "meadow", "mirror", "monkey", "moon", "mountain", "needle", "nest", "ocean",
    "orchard", "otter", "owl", "paddle", "palace", "panda", "parrot", "pebble", "pencil", "pepper", "piano",
    "pigeon", "pillow", "planet", "pocket", "pond", "puzzle", "rabbit", "raven", "ribbon", "river", "robot",
    "rocket", "saddle", "sailor", "shadow", "shell", "spider", "spoon", "squirrel", "star", "statue", "storm",
    "sword", "table", "teapot", "tiger", "tower", "tractor", "trumpet", "tulip", "turtle", "umbrella",
    "valley", "violin", "wagon", "walrus", "whale", "whistle", "window", "witch",
)
# niah haystack prose
VERBS = (
    "wandered", "rested", "waited", "danced", "slept", "sang", "worked", "played", "listened", "laughed",
    "lingered", "argued", "whispered", "stayed", "paused", "travelled",
)
PLACES = (
    "old mill", "river bank", "market square", "village well", "harbor wall", "hillside", "orchard gate",
    "town hall", "bakery", "lighthouse", "train station", "library", "bridge", "chapel", "school yard",
    "farmhouse",
)
TIMES = (
    "in the morning", "at dusk", "after the rain", "before the festival", "every winter", "on Sundays",
    "late at night", "at noon", "during the harvest", "in early spring",
)
PROSE = (
    "The {adj} {noun} {verb} near the {place} {time}.",
    "A {adj} {noun} was seen by the {place} {time}.",
    "Nobody knew why the {noun} at the {place} looked so {adj}.",
    "The children said that the {noun} was {adj}, but their teacher disagreed.",
    "Some travellers claim that a {adj} {noun} brings luck to the {place}.",
    "Everyone at the {place} talked about the {adj} {noun} for days.",
    "The {noun} and the {noun2} {verb} together {time}.",
    "An old story tells of a {adj} {noun} that lived beside the {place}.",
    "Beyond the {place}, the road grew {adj} and the {noun} {verb} alone.",
    "It was {time} that the {noun} first {verb} by the {place}.",
)
# niah needles: (statement, question, answer prefix); {name} and {value} are made-up words
NEEDLES = (
    ("The secret ingredient of the {name} {dish} is {value}.",
     "What is the secret ingredient of the {name} {dish}?", "The secret ingredient of the {name} {dish} is"),
    ("The password to the {name} {vault} is {value}.",
     "What is the password to the {name} {vault}?", "The password to the {name} {vault} is"),
    ("The captain of the {name} fleet is called {value}.",
     "What is the captain of the {name} fleet called?", "The captain of the {name} fleet is called"),
    ("The {name} tribe's word for {thing} is {value}.",
     "What is the {name} tribe's word for {thing}?", "The {name} tribe's word for {thing} is"),
)
DISHES = ("stew", "pie", "soup", "cake", "bread", "curry", "salad", "pudding", "tart", "dumplings")
VAULTS = ("vault", "gate", "tower", "archive", "observatory", "treasury")
THINGS = ("rain", "friendship", "silence", "morning", "courage", "river", "laughter", "winter")
# Made-up words are consonant-vowel syllables; the two splits use disjoint consonants.
CONSONANTS = {"train": "bdfgkl", "eval": "mnprstvz"}
VOWELS = "aeiou"

LINES_HEADER = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
    "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
    "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
    "the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n"
)
LINES_QUESTION = (
    "\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {id}? I need the number."
)
LINES_PREFIX = "The <REGISTER_CONTENT> in line {id} is"
LINE_VALUES = (1, 50000)
KV_HEADER = (
    "Below is a table of made-up codes, one per row, each with its number. Memorize the number of every "
    "code: at the end I will ask you for the number of one of them.\n\n"
)
KV_QUESTION = "\n\nThat is the whole table. What is the number of the code {id}?"
KV_PREFIX = "The number of the code {id} is"
KV_VALUES = (1, 99999)
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
PASSKEY_PREFIX = "The pass key is"
NIAH_INTRO = (
    "Below is a long text. Somewhere in it there is one important fact. Read the text carefully, "
    "then answer the question that follows it.\n\n"
)

