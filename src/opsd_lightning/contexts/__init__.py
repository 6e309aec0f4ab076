"""What each side reads: the chat-template renderer, the prompt budget, token batches, and the teacher-context
strategies (what the teacher reads before it scores the student's tokens)."""
