"""Hand-written probe questions, phrased unlike the training data (long, conversational,
exam-style). Written for this project; not taken from any data set. Used by the tests
and by ``bench/router.py`` to measure how the shipped router generalizes.

``STATEMENTS`` are requests phrased as statements or orders (product user stories and
requirements, engineering tasks) and ``FRAGMENTS`` are the short, department-naming
clauses a query planner cuts a compound question into ("and what does engineering need to
build for it?"). None of these should be rejected for its phrasing. ``ALL`` = all three."""

from __future__ import annotations

PROBE: tuple[tuple[str, str], ...] = (
    # finance
    ("Hi, I'm preparing for my CFA exam and I'm confused about how duration relates to bond price "
     "sensitivity, could you explain?", "finance"),
    ("My manager asked me to compare two projects using NPV and IRR, but they give different rankings. "
     "Which one should I trust and why?", "finance"),
    ("I'm 30 and just got my first real job. Should I put money into an index fund or pay off my "
     "student loans first?", "finance"),
    ("Could you walk me through how a company's free cash flow is derived from its income statement "
     "and balance sheet?", "finance"),
    ("What happens to my mortgage payments if the central bank raises interest rates again this year?",
     "finance"),
    ("For my accounting class, can you explain the difference between accrual and cash basis "
     "accounting with an example?", "finance"),
    ("We're a small startup and our investors want to see our burn rate and runway. How do we "
     "calculate those from our bank statements?", "finance"),
    ("Is it a good idea to diversify my retirement portfolio with some bonds now that I'm getting "
     "closer to retirement?", "finance"),
    ("How does the bank decide what interest rate to charge me on a personal loan, and can I "
     "negotiate it?", "finance"),
    ("Can someone explain how stock options are taxed when I exercise them versus when I sell the shares?",
     "finance"),
    # engineering
    ("How do I reverse a list in Python?", "engineering"),
    ("My team's microservice keeps timing out under load when we call the database, what should we look at?",
     "engineering"),
    ("I keep getting a segmentation fault in my C program when I free a pointer twice. How do I "
     "debug this properly?", "engineering"),
    ("What's the best way to set up a CI pipeline that runs our unit tests on every pull request "
     "in GitHub?", "engineering"),
    ("Our Kubernetes pods keep restarting with OOMKilled errors after the latest deploy. How should "
     "I investigate the memory usage?", "engineering"),
    ("Can you explain the difference between a process and a thread, and when I'd use asyncio instead?",
     "engineering"),
    ("I'm writing a SQL query that joins three tables and it's really slow, how do I figure out which "
     "index is missing?", "engineering"),
    ("Hey, how can I read a large CSV file in pandas without running out of memory on my laptop?",
     "engineering"),
    ("After upgrading Ubuntu my wifi driver stopped working; how do I reinstall it from the terminal?",
     "engineering"),
    ("What's a clean way to handle retries with exponential backoff when calling a flaky REST API "
     "from JavaScript?", "engineering"),
    # product
    ("As a PM, how should I prioritize the backlog for next quarter's roadmap?", "product"),
    ("I need to write user stories for a new checkout flow. What acceptance criteria should I include "
     "so the team knows when it's done?", "product"),
    ("Our customers keep asking for dark mode but engineering says it's expensive. How do I decide "
     "whether it belongs on the roadmap?", "product"),
    ("What's a good way to run user interviews to validate a feature idea before we build it?",
     "product"),
    ("As a product owner, how do I write a requirement that the system must be available 99.9% "
     "of the time?", "product"),
    ("How should we define the MVP scope for an app that helps volunteers sign up for recycling events?",
     "product"),
    ("Which metrics should a product manager track to know whether a newly launched onboarding flow "
     "is actually working?", "product"),
    ("As a site administrator, I want to be able to export the list of registered users so that I can "
     "send them a newsletter. How do I phrase this as a proper story?", "product"),
    ("The stakeholders disagree about which features go into the next release; how do I run a "
     "prioritization workshop with them?", "product"),
    ("What non-functional requirements about usability and accessibility should the new citizen "
     "portal include?", "product"),
)

STATEMENTS: tuple[tuple[str, str], ...] = (
    ("Write a user story for our checkout page", "product"),
    ("write the user stories for the paid tier", "product"),
    ("The mobile app must let customers reset their password without calling support.", "product"),
    ("Customers should be able to download every invoice as a PDF from their account page.", "product"),
    ("Draft the acceptance criteria for the saved-searches feature.", "product"),
    ("We need a requirements document for the new admin console's onboarding wizard.", "product"),
    ("Prioritize these three feature requests from our enterprise customers for the Q3 roadmap.", "product"),
    ("Refactor the login handler so it stops blocking the event loop.", "engineering"),
    ("Add retries to the nightly data export job and make the failing unit tests pass.", "engineering"),
    ("Prepare the quarterly cash-flow forecast for the board meeting.", "finance"),
)

FRAGMENTS: tuple[tuple[str, str], ...] = (
    ("and what does engineering need to build for it?", "engineering"),
    ("then ask engineering how long the migration to Postgres will take", "engineering"),
    ("and which API endpoints does the backend team have to change?", "engineering"),
    ("and what will finance say about the budget?", "finance"),
    ("and how much revenue could the paid tier bring in next year?", "finance"),
    ("also, what's the impact on our operating margin?", "finance"),
    ("and which features should product put on the roadmap first?", "product"),
    ("then write the requirements for the export feature", "product"),
)

ALL: tuple[tuple[str, str], ...] = PROBE + STATEMENTS + FRAGMENTS

OFF_TOPIC: tuple[str, ...] = (
    "play some jazz music in the living room",
    "what's the weather going to be like in Paris tomorrow",
    "set an alarm for 6:30 am",
    "tell me a joke about cats",
    "book a table for two at an italian restaurant tonight",
    "turn off the lights in the bedroom",
)
