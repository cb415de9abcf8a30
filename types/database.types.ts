export type Json =
  | string
  | number
  | boolean
  | null
  | { [key: string]: Json | undefined }
  | Json[]

export type Database = {
  public: {
    Tables: {
      ai_feedback: {
        Row: {
          comment: string | null
          created_at: string
          id: string
          message_id: string
          rating: number
          updated_at: string
          user_id: string
        }
        Insert: {
          comment?: string | null
          created_at?: string
          id?: string
          message_id: string
          rating: number
          updated_at?: string
          user_id?: string
        }
        Update: {
          comment?: string | null
          created_at?: string
          id?: string
          message_id?: string
          rating?: number
          updated_at?: string
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "ai_feedback_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
        ]
      }
      ai_plan_limits: {
        Row: {
          limit_value: number | null
          metric: string
          plan_id: string
          time_window: string
        }
        Insert: {
          limit_value?: number | null
          metric: string
          plan_id: string
          time_window: string
        }
        Update: {
          limit_value?: number | null
          metric?: string
          plan_id?: string
          time_window?: string
        }
        Relationships: [
          {
            foreignKeyName: "ai_plan_limits_plan_id_fkey"
            columns: ["plan_id"]
            isOneToOne: false
            referencedRelation: "ai_plans"
            referencedColumns: ["id"]
          },
        ]
      }
      ai_plans: {
        Row: {
          created_at: string
          description: string
          id: string
          max_queued_requests: number | null
          name: string
          reserve_tokens: number | null
          reserve_usd: number | null
          uses_own_key: boolean
        }
        Insert: {
          created_at?: string
          description?: string
          id: string
          max_queued_requests?: number | null
          name: string
          reserve_tokens?: number | null
          reserve_usd?: number | null
          uses_own_key?: boolean
        }
        Update: {
          created_at?: string
          description?: string
          id?: string
          max_queued_requests?: number | null
          name?: string
          reserve_tokens?: number | null
          reserve_usd?: number | null
          uses_own_key?: boolean
        }
        Relationships: []
      }
      ai_profiles: {
        Row: {
          created_at: string
          experience_level: string | null
          goals: Json
          preferences: Json
          updated_at: string
          user_id: string
        }
        Insert: {
          created_at?: string
          experience_level?: string | null
          goals?: Json
          preferences?: Json
          updated_at?: string
          user_id?: string
        }
        Update: {
          created_at?: string
          experience_level?: string | null
          goals?: Json
          preferences?: Json
          updated_at?: string
          user_id?: string
        }
        Relationships: []
      }
      ai_usage_windows: {
        Row: {
          cost_usd: number
          messages: number
          requests: number
          time_window: string
          tokens: number
          updated_at: string
          user_id: string
          vision_messages: number
          window_start: string
        }
        Insert: {
          cost_usd?: number
          messages?: number
          requests?: number
          time_window: string
          tokens?: number
          updated_at?: string
          user_id: string
          vision_messages?: number
          window_start: string
        }
        Update: {
          cost_usd?: number
          messages?: number
          requests?: number
          time_window?: string
          tokens?: number
          updated_at?: string
          user_id?: string
          vision_messages?: number
          window_start?: string
        }
        Relationships: []
      }
      assistant_action_requests: {
        Row: {
          action_type: string
          attempts: number
          created_at: string
          decided_at: string | null
          error_message: string | null
          executed_at: string | null
          id: string
          lease_expires_at: string | null
          lease_owner: string | null
          message_id: string | null
          payload: Json
          result: Json | null
          status: string
          thread_id: string
          updated_at: string
          user_id: string
        }
        Insert: {
          action_type: string
          attempts?: number
          created_at?: string
          decided_at?: string | null
          error_message?: string | null
          executed_at?: string | null
          id?: string
          lease_expires_at?: string | null
          lease_owner?: string | null
          message_id?: string | null
          payload?: Json
          result?: Json | null
          status?: string
          thread_id: string
          updated_at?: string
          user_id: string
        }
        Update: {
          action_type?: string
          attempts?: number
          created_at?: string
          decided_at?: string | null
          error_message?: string | null
          executed_at?: string | null
          id?: string
          lease_expires_at?: string | null
          lease_owner?: string | null
          message_id?: string | null
          payload?: Json
          result?: Json | null
          status?: string
          thread_id?: string
          updated_at?: string
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_action_requests_action_type_fkey"
            columns: ["action_type"]
            isOneToOne: false
            referencedRelation: "assistant_action_types"
            referencedColumns: ["name"]
          },
          {
            foreignKeyName: "assistant_action_requests_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "assistant_action_requests_thread_id_fkey"
            columns: ["thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_threads"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_action_types: {
        Row: {
          description: string
          name: string
          payload_schema: Json
          updated_at: string
        }
        Insert: {
          description?: string
          name: string
          payload_schema?: Json
          updated_at?: string
        }
        Update: {
          description?: string
          name?: string
          payload_schema?: Json
          updated_at?: string
        }
        Relationships: []
      }
      assistant_files: {
        Row: {
          bucket_id: string
          created_at: string
          filename: string
          id: string
          message_id: string | null
          metadata: Json
          mime_type: string
          size_bytes: number
          storage_path: string
          thread_id: string
          user_id: string
        }
        Insert: {
          bucket_id?: string
          created_at?: string
          filename: string
          id?: string
          message_id?: string | null
          metadata?: Json
          mime_type: string
          size_bytes: number
          storage_path: string
          thread_id: string
          user_id?: string
        }
        Update: {
          bucket_id?: string
          created_at?: string
          filename?: string
          id?: string
          message_id?: string | null
          metadata?: Json
          mime_type?: string
          size_bytes?: number
          storage_path?: string
          thread_id?: string
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_files_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "assistant_files_thread_id_fkey"
            columns: ["thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_threads"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_follow_ups: {
        Row: {
          created_at: string
          id: string
          message_id: string
          position: number
          suggestion: string
          thread_id: string
          used_at: string | null
          user_id: string
        }
        Insert: {
          created_at?: string
          id?: string
          message_id: string
          position: number
          suggestion: string
          thread_id: string
          used_at?: string | null
          user_id: string
        }
        Update: {
          created_at?: string
          id?: string
          message_id?: string
          position?: number
          suggestion?: string
          thread_id?: string
          used_at?: string | null
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_follow_ups_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "assistant_follow_ups_thread_id_fkey"
            columns: ["thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_threads"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_guided_questions: {
        Row: {
          assistant_id: string
          category: string | null
          created_at: string
          id: string
          is_active: boolean
          priority: number
          question: string
        }
        Insert: {
          assistant_id: string
          category?: string | null
          created_at?: string
          id?: string
          is_active?: boolean
          priority?: number
          question: string
        }
        Update: {
          assistant_id?: string
          category?: string | null
          created_at?: string
          id?: string
          is_active?: boolean
          priority?: number
          question?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_guided_questions_assistant_id_fkey"
            columns: ["assistant_id"]
            isOneToOne: false
            referencedRelation: "assistants"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_inference_events: {
        Row: {
          attempt: number
          cost_estimate_usd: number | null
          created_at: string
          error_code: string | null
          id: string
          input_tokens: number | null
          latency_ms: number | null
          message_id: string | null
          model: string
          output_tokens: number | null
          prediction_id: string | null
          provider: string
          run_id: string | null
          safety_flags_json: Json
          status: string
          thread_id: string | null
          time_to_first_token_ms: number | null
          user_id: string
        }
        Insert: {
          attempt?: number
          cost_estimate_usd?: number | null
          created_at?: string
          error_code?: string | null
          id?: string
          input_tokens?: number | null
          latency_ms?: number | null
          message_id?: string | null
          model: string
          output_tokens?: number | null
          prediction_id?: string | null
          provider: string
          run_id?: string | null
          safety_flags_json?: Json
          status: string
          thread_id?: string | null
          time_to_first_token_ms?: number | null
          user_id: string
        }
        Update: {
          attempt?: number
          cost_estimate_usd?: number | null
          created_at?: string
          error_code?: string | null
          id?: string
          input_tokens?: number | null
          latency_ms?: number | null
          message_id?: string | null
          model?: string
          output_tokens?: number | null
          prediction_id?: string | null
          provider?: string
          run_id?: string | null
          safety_flags_json?: Json
          status?: string
          thread_id?: string | null
          time_to_first_token_ms?: number | null
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_inference_events_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "assistant_inference_events_run_id_fkey"
            columns: ["run_id"]
            isOneToOne: false
            referencedRelation: "assistant_runs"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "assistant_inference_events_thread_id_fkey"
            columns: ["thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_threads"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_messages: {
        Row: {
          content: string
          created_at: string
          id: string
          image_url: string | null
          latency_ms: number | null
          metadata_json: Json
          model: string | null
          reply_to: string | null
          role: string
          thread_id: string
          token_count: number | null
          user_id: string
        }
        Insert: {
          content: string
          created_at?: string
          id?: string
          image_url?: string | null
          latency_ms?: number | null
          metadata_json?: Json
          model?: string | null
          reply_to?: string | null
          role: string
          thread_id: string
          token_count?: number | null
          user_id?: string
        }
        Update: {
          content?: string
          created_at?: string
          id?: string
          image_url?: string | null
          latency_ms?: number | null
          metadata_json?: Json
          model?: string | null
          reply_to?: string | null
          role?: string
          thread_id?: string
          token_count?: number | null
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_messages_reply_to_same_thread"
            columns: ["reply_to", "thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id", "thread_id"]
          },
          {
            foreignKeyName: "assistant_messages_thread_id_fkey"
            columns: ["thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_threads"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_runs: {
        Row: {
          admitted_at: string | null
          attempts: number
          cancel_requested_at: string | null
          created_at: string
          finished_at: string | null
          id: string
          last_error: string | null
          last_error_code: string | null
          lease_expires_at: string | null
          lease_owner: string | null
          max_attempts: number
          message_id: string
          next_attempt_at: string
          reserved_tokens: number
          reserved_usd: number
          status: string
          thread_id: string
          updated_at: string
          user_id: string
        }
        Insert: {
          admitted_at?: string | null
          attempts?: number
          cancel_requested_at?: string | null
          created_at?: string
          finished_at?: string | null
          id?: string
          last_error?: string | null
          last_error_code?: string | null
          lease_expires_at?: string | null
          lease_owner?: string | null
          max_attempts?: number
          message_id: string
          next_attempt_at?: string
          reserved_tokens?: number
          reserved_usd?: number
          status?: string
          thread_id: string
          updated_at?: string
          user_id: string
        }
        Update: {
          admitted_at?: string | null
          attempts?: number
          cancel_requested_at?: string | null
          created_at?: string
          finished_at?: string | null
          id?: string
          last_error?: string | null
          last_error_code?: string | null
          lease_expires_at?: string | null
          lease_owner?: string | null
          max_attempts?: number
          message_id?: string
          next_attempt_at?: string
          reserved_tokens?: number
          reserved_usd?: number
          status?: string
          thread_id?: string
          updated_at?: string
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_runs_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: true
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "assistant_runs_thread_id_fkey"
            columns: ["thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_threads"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_threads: {
        Row: {
          archived_at: string | null
          assistant_id: string | null
          created_at: string
          id: string
          last_message_at: string | null
          title: string | null
          updated_at: string
          user_id: string
        }
        Insert: {
          archived_at?: string | null
          assistant_id?: string | null
          created_at?: string
          id?: string
          last_message_at?: string | null
          title?: string | null
          updated_at?: string
          user_id?: string
        }
        Update: {
          archived_at?: string | null
          assistant_id?: string | null
          created_at?: string
          id?: string
          last_message_at?: string | null
          title?: string | null
          updated_at?: string
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_threads_assistant_id_fkey"
            columns: ["assistant_id"]
            isOneToOne: false
            referencedRelation: "assistants"
            referencedColumns: ["id"]
          },
        ]
      }
      assistants: {
        Row: {
          chat_model: string | null
          context_token_budget: number | null
          created_at: string
          description: string
          features: string[]
          id: string
          instructions: string
          is_active: boolean
          is_default: boolean
          max_output_tokens: number | null
          name: string
          offered_to: string
          slug: string
          temperature: number | null
          updated_at: string
          vision_model: string | null
        }
        Insert: {
          chat_model?: string | null
          context_token_budget?: number | null
          created_at?: string
          description?: string
          features?: string[]
          id?: string
          instructions?: string
          is_active?: boolean
          is_default?: boolean
          max_output_tokens?: number | null
          name: string
          offered_to?: string
          slug: string
          temperature?: number | null
          updated_at?: string
          vision_model?: string | null
        }
        Update: {
          chat_model?: string | null
          context_token_budget?: number | null
          created_at?: string
          description?: string
          features?: string[]
          id?: string
          instructions?: string
          is_active?: boolean
          is_default?: boolean
          max_output_tokens?: number | null
          name?: string
          offered_to?: string
          slug?: string
          temperature?: number | null
          updated_at?: string
          vision_model?: string | null
        }
        Relationships: []
      }
      kb_chunks: {
        Row: {
          chunk_index: number
          content: string
          created_at: string
          document_id: string
          embedding: string
          id: string
          metadata: Json
        }
        Insert: {
          chunk_index: number
          content: string
          created_at?: string
          document_id: string
          embedding: string
          id?: string
          metadata?: Json
        }
        Update: {
          chunk_index?: number
          content?: string
          created_at?: string
          document_id?: string
          embedding?: string
          id?: string
          metadata?: Json
        }
        Relationships: [
          {
            foreignKeyName: "kb_chunks_document_id_fkey"
            columns: ["document_id"]
            isOneToOne: false
            referencedRelation: "kb_documents"
            referencedColumns: ["id"]
          },
        ]
      }
      kb_documents: {
        Row: {
          assistant_id: string | null
          content_hash: string
          created_at: string
          id: string
          metadata: Json
          source: string
          title: string
          updated_at: string
        }
        Insert: {
          assistant_id?: string | null
          content_hash: string
          created_at?: string
          id?: string
          metadata?: Json
          source: string
          title: string
          updated_at?: string
        }
        Update: {
          assistant_id?: string | null
          content_hash?: string
          created_at?: string
          id?: string
          metadata?: Json
          source?: string
          title?: string
          updated_at?: string
        }
        Relationships: [
          {
            foreignKeyName: "kb_documents_assistant_id_fkey"
            columns: ["assistant_id"]
            isOneToOne: false
            referencedRelation: "assistants"
            referencedColumns: ["id"]
          },
        ]
      }
      kb_searches: {
        Row: {
          assistant_id: string | null
          created_at: string
          id: string
          query: string
          result_count: number
          run_id: string | null
          top_similarity: number | null
          user_id: string | null
        }
        Insert: {
          assistant_id?: string | null
          created_at?: string
          id?: string
          query: string
          result_count: number
          run_id?: string | null
          top_similarity?: number | null
          user_id?: string | null
        }
        Update: {
          assistant_id?: string | null
          created_at?: string
          id?: string
          query?: string
          result_count?: number
          run_id?: string | null
          top_similarity?: number | null
          user_id?: string | null
        }
        Relationships: [
          {
            foreignKeyName: "kb_searches_assistant_id_fkey"
            columns: ["assistant_id"]
            isOneToOne: false
            referencedRelation: "assistants"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "kb_searches_run_id_fkey"
            columns: ["run_id"]
            isOneToOne: false
            referencedRelation: "assistant_runs"
            referencedColumns: ["id"]
          },
        ]
      }
      user_ai_settings: {
        Row: {
          created_at: string
          plan_id: string
          preferences: Json
          preferred_chat_model: string | null
          preferred_vision_model: string | null
          updated_at: string
          user_id: string
        }
        Insert: {
          created_at?: string
          plan_id?: string
          preferences?: Json
          preferred_chat_model?: string | null
          preferred_vision_model?: string | null
          updated_at?: string
          user_id: string
        }
        Update: {
          created_at?: string
          plan_id?: string
          preferences?: Json
          preferred_chat_model?: string | null
          preferred_vision_model?: string | null
          updated_at?: string
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "user_ai_settings_plan_id_fkey"
            columns: ["plan_id"]
            isOneToOne: false
            referencedRelation: "ai_plans"
            referencedColumns: ["id"]
          },
        ]
      }
      user_replicate_tokens: {
        Row: {
          ciphertext: string | null
          pending_token: string | null
          token_hint: string
          updated_at: string
          user_id: string
          vault_secret_id: string | null
          version: number
        }
        Insert: {
          ciphertext?: string | null
          pending_token?: string | null
          token_hint: string
          updated_at?: string
          user_id: string
          vault_secret_id?: string | null
          version?: number
        }
        Update: {
          ciphertext?: string | null
          pending_token?: string | null
          token_hint?: string
          updated_at?: string
          user_id?: string
          vault_secret_id?: string | null
          version?: number
        }
        Relationships: []
      }
    }
    Views: {
      ai_feedback_summary: {
        Row: {
          comments: number | null
          last_feedback_at: string | null
          message_id: string | null
          model: string | null
          thumbs_down: number | null
          thumbs_up: number | null
        }
        Relationships: [
          {
            foreignKeyName: "ai_feedback_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
        ]
      }
      ai_usage_counters: {
        Row: {
          metric: string | null
          time_window: string | null
          updated_at: string | null
          used: number | null
          user_id: string | null
          window_start: string | null
        }
        Relationships: []
      }
      ai_usage_daily: {
        Row: {
          blocked: number | null
          cost_usd: number | null
          day: string | null
          failures: number | null
          input_tokens: number | null
          model: string | null
          output_tokens: number | null
          replies: number | null
          user_id: string | null
        }
        Relationships: []
      }
      ai_usage_monthly: {
        Row: {
          blocked: number | null
          cost_usd: number | null
          failures: number | null
          input_tokens: number | null
          model: string | null
          month: string | null
          output_tokens: number | null
          replies: number | null
          user_id: string | null
        }
        Relationships: []
      }
      ai_usage_today: {
        Row: {
          blocked: number | null
          cost_usd: number | null
          failures: number | null
          input_tokens: number | null
          model: string | null
          output_tokens: number | null
          replies: number | null
          user_id: string | null
        }
        Relationships: []
      }
    }
    Functions: {
      admit_request: {
        Args: { p_user_id: string; p_vision?: boolean }
        Returns: Json
      }
      ai_default_plan: { Args: { p_is_anonymous: boolean }; Returns: string }
      ai_plan_of: { Args: { p_user_id: string }; Returns: string }
      ai_refusal_text: { Args: { p_refusal: Json }; Returns: string }
      ai_usage_add: {
        Args: { p_deltas: Json; p_user_id: string }
        Returns: undefined
      }
      ai_window_end: {
        Args: { p_start: string; p_window: string }
        Returns: string
      }
      ai_window_start: {
        Args: { p_at?: string; p_window: string }
        Returns: string
      }
      apply_profile_preferences: {
        Args: { p_preferences: Json; p_user_id: string }
        Returns: Json
      }
      assistant_failure_text: {
        Args: { p_error_code: string }
        Returns: string
      }
      assistant_finish_blocked: {
        Args: { p_model: string; p_run_id: string; p_verdict: Json }
        Returns: undefined
      }
      assistant_finish_failed: {
        Args: { p_error: string; p_error_code: string; p_run_id: string }
        Returns: undefined
      }
      assistant_id_by_slug: { Args: { p_slug: string }; Returns: string }
      assistant_is_client: { Args: never; Returns: boolean }
      assistant_lock_requests: {
        Args: { p_run_ids: string[] }
        Returns: undefined
      }
      assistant_lock_users: {
        Args: { p_user_ids: string[]; p_wait: boolean }
        Returns: string[]
      }
      assistant_schema_version: { Args: never; Returns: string }
      assistant_user_is_guest: { Args: { p_user_id: string }; Returns: boolean }
      attachment_object: {
        Args: { p_bucket: string; p_path: string }
        Returns: Json
      }
      cancel_run: { Args: { p_run_id: string }; Returns: string }
      cancelled_runs: {
        Args: { p_run_ids: Json }
        Returns: {
          run_id: string
        }[]
      }
      claim_action_requests: {
        Args: { p_lease_seconds?: number; p_limit?: number; p_worker: string }
        Returns: {
          action_type: string
          attempts: number
          created_at: string
          decided_at: string | null
          error_message: string | null
          executed_at: string | null
          id: string
          lease_expires_at: string | null
          lease_owner: string | null
          message_id: string | null
          payload: Json
          result: Json | null
          status: string
          thread_id: string
          updated_at: string
          user_id: string
        }[]
        SetofOptions: {
          from: "*"
          to: "assistant_action_requests"
          isOneToOne: false
          isSetofReturn: true
        }
      }
      claim_runs: {
        Args: {
          p_chat_model?: string
          p_lease_seconds?: number
          p_limit?: number
          p_vision_model?: string
          p_worker: string
        }
        Returns: {
          assistant: Json
          attempt: number
          blocked_code: string
          content: string
          history: Json
          image_url: string
          max_attempts: number
          message_created_at: string
          message_id: string
          plan_id: string
          profile: Json
          run_id: string
          thread_id: string
          user_id: string
          uses_own_key: boolean
        }[]
      }
      complete_run: {
        Args: {
          p_actions?: Json
          p_attempt: number
          p_content: string
          p_cost_usd?: number
          p_follow_ups?: Json
          p_input_tokens?: number
          p_latency_ms?: number
          p_metadata?: Json
          p_model: string
          p_output_tokens?: number
          p_prediction_id?: string
          p_provider?: string
          p_run_id: string
          p_time_to_first_token_ms?: number
        }
        Returns: string
      }
      complete_runs: {
        Args: { p_runs: Json }
        Returns: {
          reply_id: string
          run_id: string
        }[]
      }
      default_assistant_id: { Args: never; Returns: string }
      extend_lease: {
        Args: {
          p_attempt: number
          p_lease_seconds?: number
          p_run_id: string
          p_worker: string
        }
        Returns: boolean
      }
      fail_attempt: {
        Args: {
          p_attempt: number
          p_consumed?: Json
          p_error?: string
          p_error_code: string
          p_latency_ms?: number
          p_model?: string
          p_prediction_id?: string
          p_provider?: string
          p_retry_in_seconds?: number
          p_retryable?: boolean
          p_run_id: string
        }
        Returns: string
      }
      finish_action_request: {
        Args: {
          p_error?: string
          p_id: string
          p_result?: Json
          p_succeeded: boolean
        }
        Returns: string
      }
      finish_cancelled: {
        Args: { p_consumed: Json; p_run_id: string }
        Returns: boolean
      }
      get_replicate_token: { Args: { p_user_id: string }; Returns: Json }
      kb_document_hashes: {
        Args: { p_assistant_id?: string }
        Returns: {
          content_hash: string
          source: string
        }[]
      }
      kb_upsert_document: {
        Args: {
          p_assistant_id?: string
          p_chunks: Json
          p_content_hash: string
          p_metadata?: Json
          p_source: string
          p_title: string
        }
        Returns: string
      }
      match_kb_chunks: {
        Args: {
          p_assistant_id?: string
          p_match_count?: number
          p_match_threshold?: number
          p_query_embedding: string
        }
        Returns: {
          chunk_index: number
          content: string
          document_id: string
          id: string
          similarity: number
          source: string
          title: string
        }[]
      }
      my_ai_usage: {
        Args: never
        Returns: {
          limit_value: number
          metric: string
          plan_id: string
          remaining: number
          resets_at: string
          time_window: string
          used: number
          window_start: string
        }[]
      }
      my_replicate_token_status: { Args: never; Returns: Json }
      pending_replicate_tokens: {
        Args: { p_limit?: number }
        Returns: {
          token: string
          user_id: string
          version: number
        }[]
      }
      prune_usage_windows: {
        Args: {
          p_hours_kept?: string
          p_limit?: number
          p_others_kept?: string
        }
        Returns: number
      }
      record_abandoned_attempt: {
        Args: { p_consumed: Json; p_run_id: string }
        Returns: boolean
      }
      record_cancelled_consumption: {
        Args: { p_consumed: Json; p_run_id: string }
        Returns: boolean
      }
      record_orphaned_consumption: {
        Args: { p_consumed: Json; p_run_id: string; p_user_id: string }
        Returns: boolean
      }
      refresh_ai_usage_reports: { Args: never; Returns: undefined }
      register_action_types: { Args: { p_types: Json }; Returns: undefined }
      release_run: {
        Args: { p_attempt: number; p_run_id: string; p_worker: string }
        Returns: boolean
      }
      run_queue_status: {
        Args: never
        Returns: {
          due_now: number
          in_progress: number
          next_due_at: string
        }[]
      }
      search_knowledge: {
        Args: {
          p_assistant_id?: string
          p_match_count?: number
          p_match_threshold?: number
          p_query: string
          p_query_embedding: string
          p_run_id?: string
          p_user_id?: string
        }
        Returns: {
          chunk_index: number
          content: string
          document_id: string
          id: string
          similarity: number
          source: string
          title: string
        }[]
      }
      set_my_replicate_token: { Args: { p_token: string }; Returns: Json }
      store_encrypted_replicate_token: {
        Args: { p_ciphertext: string; p_user_id: string; p_version: number }
        Returns: boolean
      }
    }
    Enums: {
      [_ in never]: never
    }
    CompositeTypes: {
      [_ in never]: never
    }
  }
}

type DatabaseWithoutInternals = Omit<Database, "__InternalSupabase">

type DefaultSchema = DatabaseWithoutInternals[Extract<keyof Database, "public">]

export type Tables<
  DefaultSchemaTableNameOrOptions extends
    | keyof (DefaultSchema["Tables"] & DefaultSchema["Views"])
    | { schema: keyof DatabaseWithoutInternals },
  TableName extends DefaultSchemaTableNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof (DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"] &
        DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Views"])
    : never = never,
> = DefaultSchemaTableNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? (DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"] &
      DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Views"])[TableName] extends {
      Row: infer R
    }
    ? R
    : never
  : DefaultSchemaTableNameOrOptions extends keyof (DefaultSchema["Tables"] &
        DefaultSchema["Views"])
    ? (DefaultSchema["Tables"] &
        DefaultSchema["Views"])[DefaultSchemaTableNameOrOptions] extends {
        Row: infer R
      }
      ? R
      : never
    : never

export type TablesInsert<
  DefaultSchemaTableNameOrOptions extends
    | keyof DefaultSchema["Tables"]
    | { schema: keyof DatabaseWithoutInternals },
  TableName extends DefaultSchemaTableNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"]
    : never = never,
> = DefaultSchemaTableNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"][TableName] extends {
      Insert: infer I
    }
    ? I
    : never
  : DefaultSchemaTableNameOrOptions extends keyof DefaultSchema["Tables"]
    ? DefaultSchema["Tables"][DefaultSchemaTableNameOrOptions] extends {
        Insert: infer I
      }
      ? I
      : never
    : never

export type TablesUpdate<
  DefaultSchemaTableNameOrOptions extends
    | keyof DefaultSchema["Tables"]
    | { schema: keyof DatabaseWithoutInternals },
  TableName extends DefaultSchemaTableNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"]
    : never = never,
> = DefaultSchemaTableNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"][TableName] extends {
      Update: infer U
    }
    ? U
    : never
  : DefaultSchemaTableNameOrOptions extends keyof DefaultSchema["Tables"]
    ? DefaultSchema["Tables"][DefaultSchemaTableNameOrOptions] extends {
        Update: infer U
      }
      ? U
      : never
    : never

export type Enums<
  DefaultSchemaEnumNameOrOptions extends
    | keyof DefaultSchema["Enums"]
    | { schema: keyof DatabaseWithoutInternals },
  EnumName extends DefaultSchemaEnumNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof DatabaseWithoutInternals[DefaultSchemaEnumNameOrOptions["schema"]]["Enums"]
    : never = never,
> = DefaultSchemaEnumNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? DatabaseWithoutInternals[DefaultSchemaEnumNameOrOptions["schema"]]["Enums"][EnumName]
  : DefaultSchemaEnumNameOrOptions extends keyof DefaultSchema["Enums"]
    ? DefaultSchema["Enums"][DefaultSchemaEnumNameOrOptions]
    : never

export type CompositeTypes<
  PublicCompositeTypeNameOrOptions extends
    | keyof DefaultSchema["CompositeTypes"]
    | { schema: keyof DatabaseWithoutInternals },
  CompositeTypeName extends PublicCompositeTypeNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof DatabaseWithoutInternals[PublicCompositeTypeNameOrOptions["schema"]]["CompositeTypes"]
    : never = never,
> = PublicCompositeTypeNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? DatabaseWithoutInternals[PublicCompositeTypeNameOrOptions["schema"]]["CompositeTypes"][CompositeTypeName]
  : PublicCompositeTypeNameOrOptions extends keyof DefaultSchema["CompositeTypes"]
    ? DefaultSchema["CompositeTypes"][PublicCompositeTypeNameOrOptions]
    : never

export const Constants = {
  public: {
    Enums: {},
  },
} as const

