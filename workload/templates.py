"""Prompt templates of the built-in datasets, in one place.

Spec-Bench and MT-Bench ship finished prompts and are sent verbatim. The
others ship raw fields; these templates turn them into one user message.
Where Spec-Bench has a convention for the same kind of task, the template
follows it (translation: "Translate German to English: ..."), so that tasks
drawn from different sources look alike to the model.
"""

GSM8K = "{question}"  # Spec-Bench's math_reasoning sends the bare question too

NQ_OPEN = "Answer the question in a few words.\n\nQuestion: {question}?"

NQ_RAG = (
    "Answer the question using only the document below. Answer in a few words.\n\n"
    "Document (title: {title}): {text}\n\n"
    "Question: {question}?"
)

WMT22_DE_EN = "Translate German to English: {source}"

XSUM = "Summarize the following article in one sentence.\n\n{document}"

QMSUM = "Here is a meeting transcript.\n\n{transcript}\n\nAnswer this query about the meeting: {query}"

# One transcript line, as QMSum's own baselines join the turns.
QMSUM_TURN = "{speaker}: {content}"
