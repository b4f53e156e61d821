"""Long, multi-sentence questions (conversational and exam-style) with the shipped router.

A long text embeds far from the short training texts, so the distance part of the abstain
score rejected in-domain questions for their length (4 of the 20 below before
``router_training.long_text``; none after). The questions were written for this project, not
taken from a data set. ``LONG_IN`` should route without abstaining; ``LONG_OFF`` (HR, legal,
cooking, travel, health) should mostly abstain (7 of 10 do, before and after).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.routing import Router
from router_training.long_text import expand, split_parts

REPO = Path(__file__).resolve().parents[2]

LONG_IN: tuple[tuple[str, str], ...] = (
    # engineering
    (("We run a small Kubernetes cluster for our internal tools. Since Monday one of the pods gets "
     "OOMKilled every few hours even though traffic did not change. The container limit is 512Mi. "
     "How should I figure out whether it is a memory leak or just a limit that is too low?"), "engineering"),
    (("I upgraded my laptop to the latest Ubuntu release last week. Since then the wifi drops every "
     "ten minutes and only comes back after I restart the network manager. "
     "What logs should I look at and how can I fix it?"), "engineering"),
    (("Hi! I'm a junior developer and I was asked to speed up our nightly batch job. It reads a few "
     "million rows from Postgres, transforms them in Python and writes them back. It takes six hours "
     "now. Where do I even start profiling this?"), "engineering"),
    (("Question 4 (10 points). A web service handles 2,000 requests per second with an average latency "
     "of 50 ms. Using Little's law, how many requests are in flight on average? Explain what happens "
     "if latency doubles under load."), "engineering"),
    (("Our React app got really slow after we added a big table component. Typing in the search box "
     "lags by almost a second. I suspect too many re-renders. How do I confirm that and fix it?"),
     "engineering"),
    (("We keep getting merge conflicts in the same configuration file because five people edit it "
     "every sprint. Our branches live for weeks. What git workflow would reduce this pain?"),
     "engineering"),
    (("My Docker image is 2 GB and the build takes fifteen minutes in CI. Most of it is installing "
     "dependencies again and again. How can I make the image smaller and the build faster?"),
     "engineering"),
    # finance
    (("I just started my first job and my employer offers a retirement plan with a 5% match. I also "
     "have about 20k in student loans at 6% interest. My friends disagree on what to do first. "
     "Should I max out the match or pay down the loans?"), "finance"),
    (("Exam practice: a bond pays a 5% annual coupon, has 10 years to maturity and trades at 95. "
     "Is its yield to maturity above or below 5%? Show how you would reason about it without a "
     "calculator."), "finance"),
    (("Our startup has 800k in the bank and spends about 70k a month. Revenue is growing 5% per month "
     "but is still only 20k. The board asks how many months of runway we have. "
     "How do we calculate it and what should we present?"), "finance"),
    (("My company wants to buy a new machine for 500,000 that saves 120,000 a year for six years. "
     "Our cost of capital is 9 percent. My boss wants a recommendation by Friday. "
     "How do I work out whether the investment is worth it?"), "finance"),
    (("I'm self-employed and I got paid by a client in December but the work was done in January. "
     "My accountant talks about accrual versus cash basis. Which year does the income belong to, "
     "and why does it matter?"), "finance"),
    (("So here's my situation. I have some savings sitting in a checking account earning nothing. "
     "Inflation is eating it. I'm not sure whether to buy index funds, bonds or just a high-yield "
     "savings account. What would you weigh?"), "finance"),
    (("The quarterly report shows revenue up 12% but operating cash flow went negative. Receivables "
     "doubled and inventory grew too. As an analyst, how should I interpret this and what questions "
     "should I ask management?"), "finance"),
    # product
    (("I'm the new product manager on a team that builds a mobile banking app. We have forty feature "
     "requests in the backlog and only capacity for five next quarter. Sales wants one thing, "
     "support wants another. How do I decide what goes on the roadmap?"), "product"),
    (("We are launching a subscription tier next month. I need to write the user stories and the "
     "acceptance criteria for the upgrade flow. Can you help me structure them so the developers "
     "know exactly when a story is done?"), "product"),
    (("Our onboarding completion rate dropped from 60% to 45% after the redesign. Users seem to give up "
     "on the third screen. As the PM, how would you investigate this and which metrics would you track?"),
     "product"),
    (("Case study question: a food delivery startup wants to add grocery delivery. You are the product "
     "lead. Describe how you would validate the idea with customers before building anything, and "
     "how you would define the MVP."), "product"),
    (("Stakeholders keep adding requirements to the release at the last minute. The team is frustrated "
     "and deadlines slip. What process could I introduce as the product owner to manage scope?"),
     "product"),
    (("We interviewed twelve customers about our analytics dashboard. Half want more charts and half "
     "want fewer. I have to write a requirements document for version two. "
     "How do I turn conflicting feedback into clear requirements?"), "product"),
)

LONG_OFF: tuple[str, ...] = (
    ("One of my employees has been late almost every day this month. I talked to her once already. "
    "She says it is because of childcare. How should I handle this conversation fairly?"),
    ("I was let go last week without any written notice after four years at the company. My contract "
    "mentions a notice period. Can I sue my former employer and what should I collect first?"),
    ("My landlord refuses to return my security deposit. He claims the walls need repainting but they "
    "were already like that when I moved in. What are my rights as a tenant?"),
    ("I want to bake sourdough bread for the first time this weekend. My starter is about a week old. "
    "How long should I let the dough rise and at what temperature should I bake it?"),
    ("We're planning a two-week trip to Japan in April with two kids. We want to see Tokyo, Kyoto and "
    "maybe Hiroshima. Is the rail pass worth it and how should we split the days?"),
    ("I have been getting headaches every afternoon for two weeks. I drink a lot of coffee in the "
    "morning and sleep about six hours. Should I see a doctor or try changing my habits first?"),
    ("My neighbor's tree hangs over my fence and drops leaves in my pool. I asked him politely to trim "
    "it. He refused. Am I allowed to cut the branches myself?"),
    ("We are hiring our first office manager. I have never written a job description before. "
    "What should it include and how many interview rounds are reasonable?"),
    ("I'm cooking dinner for eight people on Saturday and one guest is vegan, another is allergic to "
    "nuts. I'd like a three-course menu. What could I make that works for everyone?"),
    ("My flight to Lisbon was cancelled and the airline rebooked me two days later. I had to pay for a "
    "hotel. Am I entitled to compensation, and how do I claim it?"),
)


@pytest.fixture(scope="module")
def shipped() -> Router:
    return Router.load(REPO / "router_training" / "default", warm=False)


def test_long_in_domain_questions_are_not_rejected(shipped: Router) -> None:
    out = shipped.route_batch([q for q, _ in LONG_IN])
    rejected = [q for (q, _), r in zip(LONG_IN, out, strict=True) if r.abstained]
    # measured: 0 of 20 (4 of 20 before the length-robust score); allow one for encoder noise
    assert len(rejected) <= 1, rejected
    right = sum(r.experts[0].name == lab for (_, lab), r in zip(LONG_IN, out, strict=True))
    assert right >= 18  # measured 19 of 20


def test_long_off_topic_questions_mostly_abstain(shipped: Router) -> None:
    out = shipped.route_batch(list(LONG_OFF))
    # measured: 7 of 10 abstain, as with the whole-text score alone
    assert sum(r.abstained for r in out) >= 6


def test_short_query_has_no_parts_and_keeps_its_score(shipped: Router) -> None:
    q = "How do I reverse a list in Python?"
    assert split_parts(q) == []
    texts, owner = expand([q, LONG_IN[0][0]])
    assert texts[0] == q and len(owner) >= 3 and set(owner.tolist()) == {1}
    x = shipped.encoder.encode_one(q)[None, :]
    before = shipped.model.confidence(x, shipped.model.predict_proba(x))[0]
    assert shipped.route(q).confidence == pytest.approx(float(before), abs=0.0)


def test_long_question_scores_at_least_its_whole_text(shipped: Router) -> None:
    q = LONG_IN[0][0]
    x = shipped.encoder.encode([q])
    whole = float(shipped.model.confidence(x, shipped.model.predict_proba(x))[0])
    r = shipped.route(q)
    assert r.confidence >= whole - 1e-4
    assert not r.abstained
    assert np.isclose(sum(r.probabilities.values()), 1.0)
