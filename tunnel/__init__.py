"""tunnel"""
