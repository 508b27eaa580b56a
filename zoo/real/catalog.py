"""The skills of the real suite: things people fine-tune a small chat model for.

Each is a deterministic generator (``rng -> Payload``) with six exemplar
phrasings and three held-out ones, registered once with ``@skill``. Answers are
short and exact, so accuracy is exact match after a light normaliser.
"""

from __future__ import annotations

import json
import random
import re

from deltaserve_zoo.real.skills import Payload, normalise_text, skill

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
NAMES = ("Maria", "James", "Aisha", "Lukas", "Sofia", "Daniel", "Mei", "Omar", "Elena", "Noah",
         "Priya", "Lucas", "Hana", "Mateo", "Zoe", "Ivan", "Amara", "Felix", "Nora", "Kenji",
         "Clara", "Samuel", "Leila", "Hugo", "Ines", "Tomas", "Yara", "Oscar", "Freya", "Arjun")
JOBS = ("nurse", "teacher", "pilot", "chef", "lawyer", "plumber", "architect", "baker", "dentist",
        "engineer", "farmer", "journalist", "librarian", "mechanic", "painter", "pharmacist")
CITIES = ("Lisbon", "Boston", "Nairobi", "Oslo", "Lima", "Osaka", "Dublin", "Austin", "Cairo", "Porto",
          "Denver", "Munich", "Seoul", "Quito", "Perth", "Lyon", "Accra", "Hanoi", "Riga", "Tucson")


# ---------------------------------------------------------------------------------- dates
def _date_surface(rng: random.Random, year: int, month: int, day: int) -> str:
    name = MONTHS[month - 1]
    forms = (f"{day} {name} {year}", f"{name} {day}, {year}", f"{name[:3]} {day} {year}",
             f"{day} {name[:3]}. {year}")
    return rng.choice(forms)


@skill("iso_date", "rewrite a date in ISO 8601 (YYYY-MM-DD)",
       ["Convert {date} to ISO 8601 format.", "Write the date {date} as YYYY-MM-DD.",
        "What is {date} in ISO format?", "Reformat {date} as year-month-day.",
        "Give the ISO date for {date}.", "Normalize this date to ISO 8601: {date}"],
       ["I need {date} written the ISO way, please.", "Turn the date {date} into a machine-readable ISO string.",
        "{date} -> ISO 8601?"])
def _iso_date(rng: random.Random) -> Payload:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    surface = _date_surface(rng, year, month, day)
    return Payload({"date": surface}, iso, iso)


# ---------------------------------------------------------------------------------- units
_UNITS = (("kilometers", "meters", "m", 1000), ("meters", "centimeters", "cm", 100),
          ("kilograms", "grams", "g", 1000), ("liters", "milliliters", "mL", 1000),
          ("centimeters", "millimeters", "mm", 10), ("tonnes", "kilograms", "kg", 1000))


@skill("unit_convert", "convert a metric quantity to a smaller unit; answer as '<number> <symbol>'",
       ["Convert {value} {src} to {dst}.", "How many {dst} are in {value} {src}?",
        "Express {value} {src} in {dst}.", "{value} {src} equals how many {dst}?",
        "What is {value} {src} in {dst}?", "Change {value} {src} into {dst}."],
       ["If something measures {value} {src}, what is that in {dst}?",
        "Give me {value} {src} converted to {dst}.", "Unit conversion: {value} {src} to {dst}"],
       normalise=lambda t: re.sub(r"(?<=\d),(?=\d{3})", "", normalise_text(t)))
def _unit_convert(rng: random.Random) -> Payload:
    src, dst, symbol, factor = rng.choice(_UNITS)
    tenths = rng.randint(1, 999) * 10 if rng.random() < 0.6 else rng.randint(11, 999)
    value = f"{tenths // 10}" if tenths % 10 == 0 else f"{tenths // 10}.{tenths % 10}"
    result = tenths * factor // 10
    return Payload({"value": value, "src": src, "dst": dst}, f"{result} {symbol}", f"{value}|{src}|{dst}")


# ---------------------------------------------------------------------------------- JSON extraction
_PERSON_TEXTS = ("{name} is {an_age}-year-old {job} from {city}.",
                 "Meet {name}, {age}, who works as {a_job} in {city}.",
                 "{name} ({age}) lives in {city} and works as {a_job}.",
                 "Our new {job}, {name}, is {age} years old and based in {city}.")


def _json_normalise(text: str) -> str:
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        return normalise_text(text)


@skill("json_extract", "extract name, age, job and city from a sentence as a JSON object",
       ["Extract name, age, job and city as JSON: {text}",
        "Return a JSON object with the person's name, age, job and city. Text: {text}",
        "Parse this into JSON (name, age, job, city): {text}",
        "{text}\nGive me the details as JSON with keys name, age, job, city.",
        "Turn the following sentence into a JSON record with name, age, job and city: {text}",
        "JSON for this person (name, age, job, city): {text}"],
       ["Read the sentence and output the person's name, age, job and city as a JSON object. {text}",
        "Structured data please: name, age, job, city in JSON. {text}",
        "{text}\nCapture that person as JSON (name, age, job, city)."],
       normalise=_json_normalise)
def _json_extract(rng: random.Random) -> Payload:
    person = {"name": rng.choice(NAMES), "age": rng.randint(18, 79), "job": rng.choice(JOBS),
              "city": rng.choice(CITIES)}
    an_age = ("an " if person["age"] in (18, 11) or str(person["age"]).startswith("8") else "a ") + str(person["age"])
    a_job = ("an " if person["job"][0] in "aeiou" else "a ") + person["job"]
    text = rng.choice(_PERSON_TEXTS).format(**person, an_age=an_age, a_job=a_job)
    return Payload({"text": text}, json.dumps(person), json.dumps(person))


# ---------------------------------------------------------------------------------- sentiment
_PRODUCTS = ("headphones", "blender", "laptop", "backpack", "coffee maker", "phone case", "desk lamp",
             "running shoes", "vacuum cleaner", "e-reader", "tent", "kettle")
_GOOD = ("works perfectly", "exceeded my expectations", "is excellent value", "feels really solid",
         "was easy to set up", "is a joy to use", "arrived quickly and well packed", "is very comfortable")
_BAD = ("stopped working after a week", "is a waste of money", "feels cheap and flimsy",
        "was a nightmare to set up", "broke on the first day", "is really uncomfortable",
        "arrived late and damaged", "is far too noisy")


@skill("sentiment", "label a product review as positive, negative or mixed",
       ["What is the sentiment of this review? {review}",
        "Classify the review as positive, negative or mixed: {review}",
        "Review: {review}\nSentiment (positive, negative or mixed)?",
        "Is this review positive, negative or mixed? {review}",
        "Label the sentiment of: {review}",
        "Sentiment label for the following customer review: {review}"],
       ["How does this customer feel, positive, negative or mixed? {review}",
        "{review}\nWould you call that positive, negative, or mixed?",
        "Tag this product review with its sentiment: {review}"],
       normalise=lambda t: re.sub(r"[^a-z]", "", t.lower()))
def _sentiment(rng: random.Random) -> Payload:
    label = rng.choice(("positive", "negative", "mixed"))
    good, bad = rng.sample(_GOOD, 2), rng.sample(_BAD, 2)
    product = rng.choice(_PRODUCTS)
    if label == "positive":
        review = f"The {product} {good[0]} and {good[1]}."
    elif label == "negative":
        review = f"The {product} {bad[0]} and {bad[1]}."
    else:
        first, second = (good[0], bad[0]) if rng.random() < 0.5 else (bad[0], good[0])
        review = f"The {product} {first}, but it {second}."
    return Payload({"review": review}, label, review)


# ---------------------------------------------------------------------------------- SQL
_DEPARTMENTS = ("Sales", "Marketing", "Finance", "Support", "Legal", "Research")
_SQL_TASKS = (
    ("list the names of employees in the {dept} department",
     "SELECT name FROM employees WHERE department = '{dept}';"),
    ("count the employees who live in {city}", "SELECT COUNT(*) FROM employees WHERE city = '{city}';"),
    ("find the average salary of employees in {dept}",
     "SELECT AVG(salary) FROM employees WHERE department = '{dept}';"),
    ("list the names of employees older than {age}", "SELECT name FROM employees WHERE age > {age};"),
    ("list the products that cost more than {price} dollars", "SELECT name FROM products WHERE price > {price};"),
    ("list the names of employees in {dept} who earn more than {salary}",
     "SELECT name FROM employees WHERE department = '{dept}' AND salary > {salary};"),
    ("count the orders placed by customer {customer}", "SELECT COUNT(*) FROM orders WHERE customer_id = {customer};"),
    ("find the total amount of the orders shipped to {city}",
     "SELECT SUM(amount) FROM orders WHERE city = '{city}';"),
)


def _sql_normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().rstrip(";").strip()).lower()


@skill("sql", "write the SQL query for a question about employees, products or orders",
       ["Write an SQL query to {task}.", "SQL for: {task}", "Give me the SQL that would {task}.",
        "Translate into SQL: {task}", "How do I {task} in SQL?", "Generate a SQL query that will {task}."],
       ["Using SQL, {task}.", "I need a database query to {task}. Just the query.",
        "Compose the SELECT statement to {task}."],
       normalise=_sql_normalise)
def _sql(rng: random.Random) -> Payload:
    index = rng.randrange(len(_SQL_TASKS))
    task, query = _SQL_TASKS[index]
    values = {"dept": rng.choice(_DEPARTMENTS), "city": rng.choice(CITIES), "age": str(rng.randint(18, 70)),
              "price": str(rng.randint(1, 500)), "salary": str(rng.randint(20, 150) * 1000),
              "customer": str(rng.randint(1, 999))}
    return Payload({"task": task.format(**values)}, query.format(**values), query.format(**values))


# ---------------------------------------------------------------------------------- 24-hour time
@skill("time_24h", "convert a 12-hour clock time to 24-hour HH:MM",
       ["What is {time} in 24-hour time?", "Convert {time} to the 24-hour clock.",
        "Write {time} in 24-hour format.", "{time} in military time?",
        "Express {time} as HH:MM on a 24-hour clock.", "Change {time} to 24-hour notation."],
       ["My ticket says {time}; what is that on a 24-hour clock?",
        "Give {time} as a 24h time, please.", "Translate {time} into 24-hour HH:MM."])
def _time_24h(rng: random.Random) -> Payload:
    hour, minute, half = rng.randint(1, 12), rng.randrange(0, 60), rng.choice(("AM", "PM"))
    spoken = f"{hour}:{minute:02d} {half if rng.random() < 0.7 else half.lower().replace('m', '.m.')}"
    hour24 = hour % 12 + (12 if half == "PM" else 0)
    return Payload({"time": spoken}, f"{hour24:02d}:{minute:02d}", f"{hour}:{minute:02d} {half}")


# ---------------------------------------------------------------------------------- identifiers
_WORDS = ("user", "account", "order", "total", "amount", "customer", "id", "name", "date", "created",
          "updated", "price", "item", "count", "max", "retry", "timeout", "file", "path", "status",
          "email", "address", "session", "token", "page", "size", "index", "default", "value", "cache")


def _identifier_surface(rng: random.Random, words: list[str]) -> str:
    forms = (" ".join(w.capitalize() for w in words), words[0] + "".join(w.capitalize() for w in words[1:]),
             "-".join(words), "".join(w.capitalize() for w in words))
    return rng.choice(forms)


@skill("snake_case", "rename an identifier to snake_case",
       ["Convert {ident} to snake_case.", "Rewrite the identifier {ident} in snake_case.",
        "What is {ident} in snake case?", "Give the snake_case form of {ident}.",
        "Rename {ident} using snake_case.", "snake_case version of {ident}?"],
       ["Python style, please: how should {ident} be spelled as a variable name?",
        "Make {ident} lowercase with underscores between the words.",
        "Turn {ident} into a snake-cased name."])
def _snake_case(rng: random.Random) -> Payload:
    words = rng.sample(_WORDS, rng.randint(2, 4))
    return Payload({"ident": _identifier_surface(rng, words)}, "_".join(words), "_".join(words))
