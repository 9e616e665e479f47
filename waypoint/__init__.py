"""waypoint"""
