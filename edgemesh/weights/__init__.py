"""edgemesh.weights"""
