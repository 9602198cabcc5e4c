"""edgemesh.llm"""
