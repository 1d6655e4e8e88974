"""clipforge"""
